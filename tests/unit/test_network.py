"""The network model: scenarios parse, and a call's modelled time follows the alpha-beta ring formulas."""
import pytest

from cluster.network import SCENARIOS, parse_scenario, ring_allreduce_seconds
from orchestrator.config import ConfigError, JobSpec


def test_named_and_custom_scenarios():
    assert parse_scenario("local") is None
    net = parse_scenario("internet-1g")
    # 4 ranks, 13.3 MB: 2(p-1) = 6 rounds of 10 ms, and 1.5 x 13.3 MB at 1 Gbit/s
    assert ring_allreduce_seconds(net, 13_293_568, 4) == pytest.approx(6 * 0.010 + 1.5 * 13_293_568 * 8 / 1e9)
    c = parse_scenario("nodes=2,per_node=2,inter=1gbit,intra=50gbit,latency=200us")
    assert (c.nodes, c.per_node, c.inter.gbit_s, c.intra.gbit_s) == (2, 2, 1.0, 50.0)
    assert c.inter.latency_s == pytest.approx(200e-6)
    assert parse_scenario("per_node=4,inter=100mbit").inter.gbit_s == pytest.approx(0.1)
    assert set(SCENARIOS) >= {"local", "datacenter-100g", "cloud-10g", "internet-1g", "edge-100m"}


def test_groups_within_a_node_use_the_intra_node_link():
    c = parse_scenario("nodes=2,per_node=2,inter=1gbit,intra=50gbit,latency=1ms,intra_latency=10us")
    mb = 1_000_000
    assert c.seconds("all_reduce", mb, mb, (0, 1)) == pytest.approx(2 * 10e-6 + mb * 8 / 50e9)
    assert c.seconds("all_reduce", mb, mb, (0, 1, 2, 3)) == pytest.approx(6 * 1e-3 + mb * 8 / 1e9)
    assert c.seconds("send", mb, 0, (1, 2)) == pytest.approx(1e-3 + mb * 8 / 1e9)  # across nodes
    assert c.seconds("all_gather", mb, mb, (3,)) == 0.0  # nobody to talk to


@pytest.mark.parametrize("bad, message", [
    ("moon", "unknown (named: local"),
    ("nodes=2,inter=1gbit", "custom scenarios need per_node"),
    ("per_node=2,inter=fast", "inter='fast' is not a bandwidth"),
    ("per_node=2,inter=1gbit,latency=3", "latency='3' is not a duration"),
    ("per_node=0,inter=1gbit", "per_node='0' must be a whole number >= 1"),
    ("per_node=2,colour=red", "'colour=red' is not KEY=VALUE"),
])
def test_bad_scenarios_are_one_line(bad, message):
    with pytest.raises(ConfigError, match="scenario=") as e:
        JobSpec(workload="gpt-tiny", strategy="ddp", workers=2, scenario=bad)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_scenario_too_small_for_the_workers():
    with pytest.raises(ConfigError, match=r"2 nodes x 2 per node = 4 workers, fewer than workers=8"):
        JobSpec(workload="gpt-tiny", strategy="ddp", workers=8, scenario="nodes=2,per_node=2,inter=1gbit")
