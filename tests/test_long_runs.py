"""Long runs: checkpoints by the clock (the interval measured after the calibration steps), and what a resume
may change (how the global batch is split) and may not (the global batch; the process count of sharded states)."""

from transformers import TrainerControl, TrainerState, TrainingArguments

from pipeline.training import save_timer


def test_save_every_minutes_turns_the_budget_into_a_step_interval(monkeypatch, tmp_path):
    clock = {"now": 1000.0}
    monkeypatch.setattr(save_timer.time, "perf_counter", lambda: clock["now"])
    timer = save_timer.SaveEveryMinutes(minutes=1.0)  # 60 s
    args, state = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerState()
    state.global_step = 40  # a resumed run: the steps before this call do not count
    saved = []
    for _ in range(60):
        control = TrainerControl()
        timer.on_step_begin(args, state, control)
        clock["now"] += 4.0  # 4 s per step: 15 steps per minute
        state.global_step += 1
        timer.on_step_end(args, state, control)
        if control.should_save:
            saved.append(state.global_step)
    assert timer.interval == 15 and timer.calibrated_at == 40 + save_timer.CALIBRATION_STEPS
    assert saved == [65, 80, 95]


# ------------------------------------------------------------------------------------------------ resume layout


def _args(world, micro, accum, deepspeed=None):
    from types import SimpleNamespace

    return SimpleNamespace(world_size=world, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                           deepspeed=deepspeed, fsdp=None)  # fmt: skip


def test_a_resume_keeps_the_global_batch_and_the_sharded_process_count(tmp_path):
    import pytest

    from pipeline.errors import PipelineError
    from pipeline.training.guard import write_complete_marker
    from pipeline.training.resume import check_process_layout

    ddp, ds = tmp_path / "checkpoint-4", tmp_path / "checkpoint-8"
    ddp.mkdir(), ds.mkdir()
    write_complete_marker(ddp, 4, _args(2, 4, 2))  # global batch 16
    write_complete_marker(ds, 8, _args(8, 4, 2, deepspeed="zero2.json"))
    check_process_layout(str(ddp), _args(2, 4, 2))  # the same run
    check_process_layout(str(ddp), _args(1, 4, 4))  # one process, the accumulation doubled: the same batch
    check_process_layout(str(ddp), _args(2, 2, 4))  # the micro-batch halved, as the OOM back-off does
    with pytest.raises(
        PipelineError, match=r"global batch of 16 .* this run at 8 .*gradient_accumulation_steps 4"
    ):
        check_process_layout(str(ddp), _args(1, 4, 2))
    with pytest.raises(PipelineError, match=r"saved by 8 processes under deepspeed, this run has 4"):
        check_process_layout(str(ds), _args(4, 4, 4, deepspeed="zero2.json"))
    check_process_layout(str(ds), _args(8, 4, 2, deepspeed="zero2.json"))


def test_deepspeed_from_an_accelerate_config_counts_as_deepspeed(tmp_path, monkeypatch):
    """`accelerate launch --config_file deepspeed_zero2.yaml` leaves args.deepspeed unset: the environment
    says DeepSpeed, and a checkpoint so saved is not resumed over another process count."""
    import pytest

    from pipeline.errors import PipelineError
    from pipeline.training.guard import write_complete_marker
    from pipeline.training.resume import check_process_layout

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    write_complete_marker(folder, 2, _args(4, 2, 2))
    with pytest.raises(PipelineError, match="saved by 4 processes under deepspeed, this run has 2"):
        check_process_layout(str(folder), _args(2, 2, 4))


def test_sizes_and_budgets_must_be_positive():
    import pytest

    from pipeline.configs import DataArguments, parse_stage_args
    from pipeline.errors import PipelineError

    for flag, value in (
        ("--max_train_samples", "0"),
        ("--max_eval_samples", "-3"),
        ("--save_every_minutes", "0"),
    ):
        with pytest.raises(PipelineError, match=f"{flag[2:]} must be positive"):
            parse_stage_args((DataArguments,), [flag, value], "sft")
    (parsed,) = parse_stage_args(
        (DataArguments,), ["--max_train_samples", "5", "--save_every_minutes", "30"], "sft"
    )
    assert parsed.max_train_samples == 5 and parsed.save_every_minutes == 30
