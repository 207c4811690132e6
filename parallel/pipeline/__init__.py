"""Pipeline parallelism: schedules as pure action lists (GPipe, 1F1B, interleaved 1F1B), the communication plan
derived from them, a simulation that proves it, and the executor that runs it on stages (in lockstep rounds where
batches of p2p ops complete as a whole, NCCL)."""

from .executor import AutogradStage, Stage, run_rounds
from .partition import all_reduce_tied_gradients, local_virtual_stages, stage_layer_ids
from .plan import (Message, PipelineHangError, Round, Step, plan_lockstep, plan_pipeline, plan_steps, rounds_of,
                   virtual_stage)
from .schedules import (SCHEDULES, Action, ScheduleError, forward_only, gpipe, ideal_bubble_fraction,
                        interleaved_1f1b, micro_batch_count, one_f_one_b, schedule_actions)
from .simulate import Timeline, plan_rank, simulate, simulate_rounds

__all__ = ["SCHEDULES", "Action", "AutogradStage", "Message", "PipelineHangError", "Round", "ScheduleError", "Stage",
           "Step", "Timeline", "all_reduce_tied_gradients", "forward_only", "gpipe", "ideal_bubble_fraction",
           "interleaved_1f1b", "local_virtual_stages", "micro_batch_count", "one_f_one_b", "plan_lockstep",
           "plan_pipeline", "plan_rank", "plan_steps", "rounds_of", "run_rounds", "schedule_actions",
           "simulate", "simulate_rounds", "stage_layer_ids", "virtual_stage"]
