"""``pnnh train`` when things go wrong: a reused --out, a diverging run, corrupt files, a full disk,
and the small frictions of the command line. Every failure names what failed and keeps the last
good epoch."""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from pnnh_kernels.backends import BackendUnavailableError
from pnnh_kernels.commands import build_parser
from pnnh_kernels.commands import main as pnnh_main
from pnnh_kernels.commands import train as train_command
from pnnh_kernels.training import checkpoint, trainer
from pnnh_kernels.training.checkpoint import load_for_resume
from pnnh_kernels.training.data import ImageFolder, load_cifar
from pnnh_kernels.training.optim import WarmupSchedule
from pnnh_kernels.training.trainer import TrainConfig, Trainer, resolve_precision
from tests.test_training import SMOKE, write_cifar, write_folder

# SMOKE with 2 steps an epoch and 1 test batch: for runs that only need to exist.
TINY = [*SMOKE, "--synthetic-train-size", "32", "--synthetic-test-size", "16"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


def _config(out: Path, **changes) -> TrainConfig:
    values = dict(
        data="synthetic", image_size=16, batch_size=16, lr=0.02, synthetic_train_size=64,
        synthetic_test_size=32, precision="fp32", workers=0, epochs=2, out=str(out),
    )  # fmt: skip
    values.update(changes)
    return TrainConfig(**values)


def _epochs_saved(out: Path) -> int:
    return int(torch.load(out / "last.pt", map_location="cpu", weights_only=True)["epoch"])


def _one_line_error(capsys, command: str) -> str:
    """The message of a usage error of ``pnnh command``: argparse's form, one line on stderr."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.endswith("\n"), err
    assert "Traceback" not in err
    prefix = f"pnnh {command}: error: "
    assert err.startswith(prefix), err
    return err[len(prefix) : -1]


# -- one run per --out -------------------------------------------------------------------------


def test_a_second_run_into_the_same_out_is_refused(tmp_path, capsys):
    pnnh_main(["train", *SMOKE, "--epochs", "1", "--out", str(tmp_path)])
    before = (tmp_path / "last.pt").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        pnnh_main(["train", *SMOKE, "--epochs", "1", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    error = _one_line_error(capsys, "train")
    assert "already holds a run (last.pt, metrics.jsonl" in error
    assert "--resume" in error
    assert "--overwrite" in error
    assert (tmp_path / "last.pt").read_bytes() == before  # untouched
    # The trainer itself raises (the command line reports it in one line).
    with pytest.raises(FileExistsError, match=r"already holds a run \(last.pt, metrics.jsonl"):
        Trainer(_config(tmp_path, epochs=1))


def test_overwrite_replaces_the_run(tmp_path):
    pnnh_main(["train", *SMOKE, "--epochs", "1", "--out", str(tmp_path)])
    (tmp_path / "accuracy.png").unlink()  # a new run must not leave the old files behind either
    (tmp_path / "summary.json").write_text('{"old": true}')
    pnnh_main(["train", *SMOKE, "--epochs", "1", "--seed", "3", "--out", str(tmp_path), "--overwrite"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["seed"] == 3
    assert summary["config"]["overwrite"] is True


def test_overwrite_and_resume_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--overwrite"):
        _config(tmp_path, overwrite=True, resume=str(tmp_path / "last.pt")).validate()


def test_an_empty_or_unrelated_out_folder_is_fine(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    Trainer(_config(tmp_path, epochs=1)).fit()
    assert (tmp_path / "notes.txt").read_text() == "mine"


# -- divergence ----------------------------------------------------------------------------------


def _poison_logits(trainer: Trainer, when) -> None:
    """Make the model's logits NaN where ``when(module, n)`` is true (a forward hook; ``n`` counts
    the forwards in the module's mode, training or evaluation, from 1)."""
    calls = {True: 0, False: 0}

    def hook(module, args, output):
        calls[module.training] += 1
        return output * float("nan") if when(module, calls[module.training]) else output

    trainer.model.register_forward_hook(hook)


def test_a_nan_training_loss_names_the_epoch_the_step_and_the_last_finite_loss(tmp_path):
    trainer = Trainer(_config(tmp_path, epochs=3))
    steps = trainer.data.steps_per_epoch  # 4
    # Training forwards only: epoch 1 is clean, epoch 2 turns NaN at its third step.
    _poison_logits(trainer, lambda m, n: m.training and n > steps + 2)
    with pytest.raises(FloatingPointError) as error:
        trainer.fit()
    message = str(error.value)
    assert "diverged in epoch 2: the training loss is nan" in message
    assert f"first at step 3 of {steps}" in message
    assert "the last finite loss: test loss" in message
    assert "in epoch 1" in message
    assert _epochs_saved(tmp_path) == 1  # the last good epoch stays
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_nan_test_loss_is_an_error_before_the_epoch_is_saved(tmp_path):
    trainer = Trainer(_config(tmp_path, epochs=2))
    # The evaluation after epoch 1 is clean; the one after epoch 2 is NaN.
    _poison_logits(trainer, lambda m, n: not m.training and n > 2)  # 2 test batches an epoch
    with pytest.raises(FloatingPointError, match="diverged in epoch 2: the test loss is nan") as e:
        trainer.fit()
    assert "the last finite loss: train loss" in str(e.value)
    assert "in epoch 2" in str(e.value)
    assert _epochs_saved(tmp_path) == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1]


# -- unreadable files ----------------------------------------------------------------------------


def test_a_truncated_cifar_batch_is_named(tmp_path):
    write_cifar(tmp_path, "cifar10")
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable CIFAR batch, truncated or corrupt") as e:
        load_cifar(tmp_path, "cifar10", train=True)
    assert str(batch) in str(e.value)


def test_a_cifar_file_that_is_not_a_dict_is_named(tmp_path):
    write_cifar(tmp_path, "cifar10")
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    import pickle

    meta.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="expected a pickled dict, got list") as e:
        load_cifar(tmp_path, "cifar10", train=False)
    assert str(meta) in str(e.value)


def test_an_undecodable_image_is_named(tmp_path):
    write_folder(tmp_path, classes=2, per_class=2)
    image = sorted((tmp_path / "train").rglob("*.png"))[0]
    image.write_bytes(image.read_bytes()[:60])  # a truncated PNG
    dataset = ImageFolder(tmp_path / "train", 16, train=False)
    index = next(i for i, (path, _) in enumerate(dataset.samples) if Path(path) == image)
    with pytest.raises(ValueError, match="cannot decode the image") as e:
        dataset[index]
    assert str(image) in str(e.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (None, "cannot be read as a checkpoint, truncated"),
        (b"junk" * 10, "cannot be read"),
    ],
    ids=["empty", "truncated", "junk"],
)
def test_an_unreadable_checkpoint_is_named(tmp_path, content, message):
    Trainer(_config(tmp_path / "run", epochs=1)).fit()
    path = tmp_path / "bad.pt"
    whole = (tmp_path / "run" / "last.pt").read_bytes()
    path.write_bytes(whole[: len(whole) // 2] if content is None else content)
    with pytest.raises(ValueError, match=message) as e:
        load_for_resume(path, {})
    assert str(path) in str(e.value)


# -- a full disk ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 512 vs 448"),
    ],
    ids=["ENOSPC", "torch-zip-writer"],
)
def test_a_full_disk_fails_at_the_save_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    real_save = torch.save
    saves = {"n": 0}

    def save_until_the_disk_fills(state, path):
        saves["n"] += 1
        if saves["n"] == 1:
            return real_save(state, path)
        Path(path).write_bytes(b"x" * 4096)  # half a checkpoint, then the device is full
        raise failure

    monkeypatch.setattr(checkpoint.torch, "save", save_until_the_disk_fills)
    with pytest.raises(OSError, match="could not write the checkpoint") as error:
        Trainer(_config(tmp_path, epochs=2)).fit()
    message = str(error.value)
    assert str(tmp_path / "last.pt") in message
    assert type(failure).__name__ in message
    assert "bytes free there" in message
    assert "the previous last.pt is unchanged" in message
    assert not (tmp_path / ".last.pt.partial").exists()
    assert _epochs_saved(tmp_path) == 1


def test_too_little_space_for_a_checkpoint_fails_before_training(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: usage._replace(free=1_000_000))
    with pytest.raises(OSError, match=r"--out: .* has 1,000,000 bytes free; a checkpoint"):
        Trainer(_config(tmp_path, epochs=1)).fit()
    assert not (tmp_path / "last.pt").exists()


# -- the command line ----------------------------------------------------------------------------


def test_train_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 200)", "0.1 per 128 images", "(default: runs/train)", "(default: 8)"):
        assert shown in text


def _train_parser() -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["train"]


def test_train_help_says_what_every_option_does_and_its_default_once():
    parser = _train_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if "--help" in action.option_strings:
            continue
        text = formatter._expand_help(action)  # the option's help as --help prints it
        assert text.count("(default:") == 1, (action.option_strings, text)
        assert not text.startswith("(default:"), (action.option_strings, text)  # a default only
        for internal in ("(default: None)", "(default: False)", "==SUPPRESS=="):
            assert internal not in text, (action.option_strings, text)
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert {"--threads", "--override-resume-settings", "--no-compile"} <= flags


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--epochs", "0"], "--epochs: expected a positive int, got 0"),
        (["--threads", "0"], "--threads: expected a positive int, got 0"),
        (["--workers", "-1"], "--workers: expected an int >= 0, got -1"),
        (["--synthetic-train-size", "8"], "--batch-size: 16 is larger than the 8 training images"),
        (["--data", "cifar10"], "--data-dir: required for --data cifar10"),
        (["--data", "cifar10", "--data-dir", "{tmp}"], "--data-dir: no cifar10 data in {tmp}"),
        (["--data", "folder", "--data-dir", "{tmp}"],
         "--data-dir: expected the image folder {tmp}/train"),
        (["--override-resume-settings"], "--override-resume-settings: applies to a --resume only"),
        (["--resume", "{tmp}/missing.pt"], "--resume: no checkpoint at {tmp}/missing.pt"),
        pytest.param(["--device", "cuda"], "--device cuda: torch.cuda.is_available() is False",
                     marks=NO_GPU),
        pytest.param(["--backend", "cuda"], "--backend cuda: backend='cuda' cannot run conv2d on "
                     "cpu with torch.float32: the CUDA kernels run on CUDA tensors", marks=NO_GPU),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_with_status_2_and_create_nothing(
    tmp_path, capsys, monkeypatch, arguments, message
):
    def read_data(*args, **kwargs):
        raise AssertionError("the data was read before the arguments were checked")

    monkeypatch.setattr(trainer, "ImageData", read_data)
    arguments = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        pnnh_main(["train", *TINY, "--out", str(out), *arguments])
    assert exit_info.value.code == 2
    assert _one_line_error(capsys, "train").startswith(message.replace("{tmp}", str(tmp_path)))
    assert not out.exists()


@NO_GPU
def test_an_unavailable_backend_is_refused_before_the_data_and_model_are_built(tmp_path, monkeypatch):
    def read_data(*args, **kwargs):
        raise AssertionError("the data was read before the backend was checked")

    monkeypatch.setattr(trainer, "ImageData", read_data)
    with pytest.raises(BackendUnavailableError, match=r"--backend cuda: .* on cpu .*--backend auto"):
        Trainer(_config(tmp_path / "run", backend="cuda"))
    assert not (tmp_path / "run").exists()


def test_the_backend_check_knows_the_ops_of_every_model():
    from pnnh_kernels import FusedPNNHConv, FusedPNNHLinear

    for name in trainer.MODELS:
        with torch.device("meta"):
            model = trainer.build_model(TrainConfig(model=name, data="synthetic"), num_classes=10)
        ops = {
            "conv2d" if isinstance(module, FusedPNNHConv) else "linear"
            for module in model.modules()
            if isinstance(module, (FusedPNNHConv, FusedPNNHLinear))
        }
        assert set(trainer.LAYER_OPS[name]) == ops, name


# -- resuming: the checkpoint's settings -------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """The folder of a 2-epoch run stopped after its first epoch (--stop-after 1). Tests read it or
    resume it into another --out; none changes it."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        pnnh_main(["train", *TINY, "--epochs", "2", "--stop-after", "1", "--out", str(out)])
    return out


def test_stop_after_prints_the_resume_command_which_alone_finishes_the_run(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    pnnh_main(["train", *TINY, "--epochs", "2", "--stop-after", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    command = f"pnnh train --resume {shlex.quote(str(out / 'last.pt'))}"
    assert f"stopped after epoch 1 of 2 (--stop-after 1); continue with: {command}\n" in printed
    # The printed command, from another folder: no setting repeated, the run's own --out. (A resume
    # used to take every setting not repeated from the defaults: 200 epochs of 512 images at 32
    # pixels, into runs/train.)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        pnnh_main([*shlex.split(command)[1:], "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "(32 training images, 10 classes)" in printed
    assert "epochs 2-2" in printed
    assert not (tmp_path / "runs").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["epochs_completed"], summary["epochs_planned"]) == (2, 2)
    assert summary["peak_lr"] == 0.02
    config = summary["config"]
    assert config["out"] == str(out)
    expected = {"image_size": 16, "batch_size": 16, "synthetic_train_size": 32, "workers": 0}
    assert {key: config[key] for key in expected} == expected
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["epoch"] for row in rows] == [1, 2]

    # Resuming the finished run says so, trains nothing, changes nothing and exits with status 0.
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    pnnh_main(shlex.split(command)[1:])
    printed = capsys.readouterr().out
    assert "holds a finished run (2 epochs done, --epochs 2, final test accuracy" in printed
    assert "add --epochs N --override-resume-settings (N > 2)" in printed
    assert "epoch 3" not in printed
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_a_flag_that_contradicts_the_checkpoint_is_refused_in_one_line(stopped_run, capsys):
    path = str(stopped_run / "last.pt")
    before = {p.name: p.read_bytes() for p in stopped_run.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        pnnh_main(["train", "--resume", path, "--epochs", "200", "--image-size", "32",
                   "--synthetic-train-size", "512", "--workers", "2"])  # fmt: skip
    assert exit_info.value.code == 2
    assert _one_line_error(capsys, "train") == (
        f"--epochs 200, --image-size 32, --synthetic-train-size 512 contradict the checkpoint "
        f"{path}, a run with --epochs 2, --image-size 16, --synthetic-train-size 32; a resume "
        "continues with its run's own settings: drop --epochs, --image-size, "
        "--synthetic-train-size, or add --override-resume-settings to apply them from epoch 2"
    )  # --workers says how, not what, the run trains: it may change
    assert {p.name: p.read_bytes() for p in stopped_run.iterdir()} == before
    # A flag repeated with the checkpoint's value is no contradiction; the given --lr is compared
    # with what the run trained at, --no-nesterov as what it is.
    args = build_parser().parse_args(["train", *TINY, "--epochs", "2", "--resume", path])
    train_command.check(args)
    assert (args.config.epochs, args.config.image_size, args.epochs_done) == (2, 16, 1)
    with pytest.raises(SystemExit):
        pnnh_main(["train", "--resume", path, "--no-nesterov"])
    assert "--no-nesterov contradicts the checkpoint" in _one_line_error(capsys, "train")


def test_the_api_refuses_a_resume_with_other_settings_too(stopped_run, tmp_path):
    resume = str(stopped_run / "last.pt")
    with pytest.raises(ValueError, match=r"^--epochs 5 contradicts the checkpoint .*--epochs 2;"):
        Trainer(_config(tmp_path / "run", lr=0.02, synthetic_train_size=32, synthetic_test_size=16,
                        epochs=5, resume=resume))  # fmt: skip
    with pytest.raises(ValueError, match=r"--variant plain contradicts .* not even with"):
        Trainer(_config(tmp_path / "run", synthetic_train_size=32, synthetic_test_size=16,
                        variant="plain", resume=resume, override_resume_settings=True))  # fmt: skip


def test_override_applies_the_given_settings_from_the_next_epoch(stopped_run, tmp_path):
    out = tmp_path / "longer"
    with pytest.warns(UserWarning, match=r"differ .* apply from epoch 2: --epochs, --lr$"):
        pnnh_main(["train", "--resume", str(stopped_run / "last.pt"), "--out", str(out),
                   "--epochs", "3", "--lr", "0.01", "--stop-after", "1",
                   "--override-resume-settings"])  # fmt: skip
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    assert (state["config"]["epochs"], state["config"]["lr"]) == (3, 0.01)
    # The optimizer's restored state had the checkpoint's peak (0.02): the override replaces it,
    # and the schedule, rebuilt for 3 epochs of 2 steps, is at the step where epoch 3 begins.
    groups = state["optimizer"]["param_groups"]
    assert [group["initial_lr"] for group in groups] == [0.01, 0.01]
    assert state["scheduler"]["last_epoch"] == 4
    expected = 0.01 * WarmupSchedule("cosine", total_steps=6, warmup_steps=2)(4)
    assert groups[0]["lr"] == pytest.approx(expected)
    assert json.loads((out / "summary.json").read_text())["peak_lr"] == 0.01


@NO_GPU
def test_a_resume_names_the_checkpoints_backend_when_it_cannot_run_here(stopped_run, tmp_path, capsys):
    state = torch.load(stopped_run / "last.pt", map_location="cpu", weights_only=True)
    state["config"]["backend"] = "cuda"  # a run started on a GPU with --backend cuda
    path = tmp_path / "gpu-run" / "last.pt"
    path.parent.mkdir()
    torch.save(state, path)
    with pytest.raises(SystemExit):
        pnnh_main(["train", "--resume", str(path)])
    error = _one_line_error(capsys, "train")
    assert error.startswith("--backend cuda: backend='cuda' cannot run conv2d on cpu")
    assert error.endswith(
        "--backend cuda is the checkpoint's setting: give --backend to resume with another"
    )
    args = build_parser().parse_args(["train", "--resume", str(path), "--backend", "torch"])
    train_command.check(args)  # --backend may change on a resume: it trains the same model
    assert args.config.backend == "torch"


def test_profile_layer_argument_is_checked(capsys):
    with pytest.raises(SystemExit) as stopped:  # the old CHANNELS,SIZE,BATCH form included
        pnnh_main(["profile", "--layer", "64,32,256", "--backend", "torch", "--dtype", "fp32"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("pnnh profile: error: --layer: expected NxCxHxW"), error
    assert "\n" not in error


@pytest.mark.parametrize("size", [0, -3, 4])
def test_image_size_is_checked(size):
    with pytest.raises(ValueError, match="--image-size: expected an int >= 8"):
        _config(Path("unused"), image_size=size).validate()


def test_precision_auto_is_fp32_on_the_cpu_and_16_bits_warn():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    for name in ("bf16", "fp16"):
        with pytest.warns(UserWarning, match=f"--precision {name} on the CPU"):
            assert resolve_precision(name, cpu) == name


def test_a_one_channel_layer_gets_a_coder():
    from pnnh_kernels import FusedPNNHConv, FusedPNNHLinear

    assert FusedPNNHConv(1, 1).coder.code_channels == 1
    assert FusedPNNHLinear(1, 3).coder.code_channels == 1
    assert FusedPNNHConv(1, 1, coder_channels=0).coder is None


# -- the README's smoke run ----------------------------------------------------------------------


def test_the_readme_smoke_run_trains_with_the_defaults(tmp_path):
    # The exact command of the README (its --out moved to tmp_path): with the defaults it must
    # learn, not diverge (at a fixed lr 0.1 it gave NaN in epoch 2, or a test loss of 3e5 and 27%
    # accuracy after 4 epochs; the batch-scaled default 0.025 reached 100% at seed 0).
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.rstrip().endswith("# smoke run"))
    words = line.split("#")[0].split()
    assert words[:2] == [".venv/bin/pnnh", "train"], line
    arguments = words[2:]
    arguments[arguments.index("--out") + 1] = str(tmp_path)
    pnnh_main(["train", *arguments, "--workers", "0"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert rows[-1]["test_accuracy"] >= 0.6, rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert json.loads((tmp_path / "summary.json").read_text())["peak_lr"] == 0.025


def test_resuming_into_another_runs_folder_is_refused(tmp_path):
    Trainer(_config(tmp_path / "a", epochs=1)).fit()
    Trainer(_config(tmp_path / "b", epochs=1, seed=5)).fit()
    before = (tmp_path / "b" / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match=r"holds another run .* resuming .*a/last.pt there"):
        Trainer(_config(tmp_path / "b", epochs=2, resume=str(tmp_path / "a" / "last.pt")))
    assert (tmp_path / "b" / "last.pt").read_bytes() == before
    # Its own folder, or an empty one, is fine.
    Trainer(_config(tmp_path / "a", epochs=1, resume=str(tmp_path / "a" / "last.pt")))
    Trainer(_config(tmp_path / "c", epochs=1, resume=str(tmp_path / "a" / "last.pt")))


def test_overwrite_deletes_the_old_run_before_the_first_epoch(tmp_path):
    # A replacement run that fails before its first epoch must not leave the old run's checkpoint
    # and metrics behind as if they were its own.
    Trainer(_config(tmp_path, epochs=1)).fit()
    trainer = Trainer(_config(tmp_path, epochs=1, overwrite=True))
    _poison_logits(trainer, lambda m, n: m.training)
    with pytest.raises(FloatingPointError, match="Nothing was saved"):
        trainer.fit()
    assert not (tmp_path / "last.pt").exists()
    assert not (tmp_path / "metrics.jsonl").exists()
