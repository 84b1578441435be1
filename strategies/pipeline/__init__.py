"""Pipeline parallelism: schedules as data, generators, a simulator, an automatic
scheduler, the pipeline part that executes them (``part``), the registered
``pipeline`` strategy (``strategy``), and Gantt charts
(``strategies.pipeline.gantt``, imported on demand: it needs matplotlib)."""
from strategies.pipeline.actions import Action, Op, Schedule, ScheduleError, parse_action, parse_schedule, validate
from strategies.pipeline.auto import AutoResult, auto_schedule
from strategies.pipeline.generators import HANDCRAFTED, SCHEDULES, generate, placement
from strategies.pipeline.simulate import SimResult, StageCost, simulate, uniform_costs
from strategies.pipeline.strategy import Pipeline, PipelineOptions

__all__ = [
    "Action", "AutoResult", "HANDCRAFTED", "Op", "Pipeline", "PipelineOptions", "SCHEDULES", "Schedule",
    "ScheduleError", "SimResult", "StageCost", "auto_schedule", "generate", "parse_action", "parse_schedule",
    "placement", "simulate", "uniform_costs", "validate",
]
