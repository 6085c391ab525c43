"""A checkpoint that does not load (truncated, not a checkpoint, other weights, a pickle that runs
code) is reported by path, set aside as `<name>.corrupt`, and training starts from step 0."""

from __future__ import annotations

import pickle

import pytest
import torch

from tests.tiny_training import make_trainer


class Killed(Exception):
    pass


def interrupted_checkpoint(path):
    """The checkpoint a run killed at step 17 leaves (saved at step 14)."""
    trainer, _ = make_trainer(path, checkpoint_every=7)

    def dies_at_step_17(step):
        if step == 17:
            raise Killed
        return trainer.next_batch(step)

    with pytest.raises(Killed):
        trainer.fit(dies_at_step_17)
    return path


class RunsCode:
    def __reduce__(self):
        return (print, ("PAYLOAD RAN",))


def truncated(path):
    data = interrupted_checkpoint(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])


def other_weights(path):
    interrupted_checkpoint(path)
    state = torch.load(path, weights_only=True)
    state["module"] = {key: tensor[..., :1] for key, tensor in state["module"].items()}
    torch.save(state, path)


@pytest.mark.parametrize(
    "spoil, reason",
    [
        (truncated, "truncated, or not a checkpoint of plain tensors"),
        (lambda path: path.write_bytes(b"not a checkpoint"), "not a checkpoint of plain tensors: UnpicklingError"),
        (lambda path: path.write_bytes(b""), ""),
        (lambda path: torch.save({"step": 3}, path), "not a training checkpoint"),
        (other_weights, "its module weights do not fit the model"),
        (lambda path: path.write_bytes(pickle.dumps(RunsCode())), "not a checkpoint of plain tensors: UnpicklingError"),
    ],
    ids=["truncated", "garbage", "empty", "not-a-checkpoint", "other-weights", "pickle-runs-code"],
)
def test_a_checkpoint_that_does_not_load_is_set_aside_and_training_starts_fresh(tmp_path, capsys, spoil, reason):
    checkpoint = tmp_path / "state.pt"
    spoil(checkpoint)
    capsys.readouterr()
    trainer, _ = make_trainer(checkpoint, checkpoint_every=7)
    out = capsys.readouterr().out
    assert trainer.start_step == 0
    assert f"{checkpoint} does not load" in out and reason in out and "set it aside as state.pt.corrupt" in out, out
    assert "PAYLOAD RAN" not in out
    assert (tmp_path / "state.pt.corrupt").exists() and not checkpoint.exists()


def test_after_a_truncated_checkpoint_training_is_a_fresh_run(tmp_path):
    checkpoint = tmp_path / "state.pt"
    truncated(checkpoint)
    trainer, _ = make_trainer(checkpoint, checkpoint_every=7)
    fresh = trainer.fit(trainer.next_batch)
    reference, _ = make_trainer(None)
    expected = reference.fit(reference.next_batch)
    for name, tensor in expected.module.state_dict().items():
        assert torch.equal(tensor, fresh.module.state_dict()[name]), name
    assert checkpoint.exists()  # and it checkpoints again
