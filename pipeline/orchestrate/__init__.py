"""Orchestration: the stages as submitit jobs on Slurm (or locally), their requeue on preemption, and what a submitted
run is doing. It wraps the stages through their seams (stop condition, callbacks) and is imported by no stage."""
from .jobs import ExtractTaskJob, TrainJob
from .record import Submission, load_submission
from .status import TaskRow, status_rows
from .submit import submit

__all__ = ["ExtractTaskJob", "Submission", "TaskRow", "TrainJob", "load_submission", "status_rows", "submit"]
