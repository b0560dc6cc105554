"""``pnnh train`` when things go wrong: a reused --out, a diverging run, corrupt files, a full disk,
and the small frictions of the command line. Every failure names what failed and keeps the last
good epoch."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from pnnh_kernels.commands import build_parser
from pnnh_kernels.commands import main as pnnh_main
from pnnh_kernels.training import checkpoint
from pnnh_kernels.training.checkpoint import load_for_resume
from pnnh_kernels.training.data import ImageFolder, load_cifar
from pnnh_kernels.training.trainer import TrainConfig, Trainer, resolve_precision
from tests.test_training import SMOKE, write_cifar, write_folder


def _config(out: Path, **changes) -> TrainConfig:
    values = dict(
        data="synthetic", image_size=16, batch_size=16, lr=0.02, synthetic_train_size=64,
        synthetic_test_size=32, precision="fp32", workers=0, epochs=2, out=str(out),
    )  # fmt: skip
    values.update(changes)
    return TrainConfig(**values)


def _epochs_saved(out: Path) -> int:
    return int(torch.load(out / "last.pt", map_location="cpu", weights_only=True)["epoch"])


# -- one run per --out -------------------------------------------------------------------------


def test_a_second_run_into_the_same_out_is_refused(tmp_path):
    pnnh_main(["train", *SMOKE, "--epochs", "1", "--out", str(tmp_path)])
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds a run \(last.pt, metrics.jsonl") as e:
        pnnh_main(["train", *SMOKE, "--epochs", "1", "--out", str(tmp_path)])
    assert "--resume" in str(e.value)
    assert "--overwrite" in str(e.value)
    assert (tmp_path / "last.pt").read_bytes() == before  # untouched


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


def test_profile_layer_argument_is_checked(capsys):
    with pytest.raises(ValueError, match="--layer: expected CHANNELS,SIZE,BATCH, three positive ints"):
        pnnh_main(["profile", "--layer", "8,8", "--backend", "torch", "--dtype", "fp32"])


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
    Trainer(_config(tmp_path / "a", epochs=2, resume=str(tmp_path / "a" / "last.pt")))
    Trainer(_config(tmp_path / "c", epochs=2, resume=str(tmp_path / "a" / "last.pt")))


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
