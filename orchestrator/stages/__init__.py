"""Pipeline stages: plain functions `stage(ctx: StageContext) -> StageResult`, one module each
(the training stages share train.py and its Ray Train worker, train_worker.py). What each stage
writes is listed in run/layout.py; how a stage is chosen to run, in run/runner.py."""
