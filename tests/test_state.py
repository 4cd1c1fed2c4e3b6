"""The resume state and its rules: every config key is classified, refused changes name their key, the
schedule continues without a jump, and the dataset fingerprint follows content, not paths."""

import dataclasses

import pytest

from distvae.config import Config, load_config
from distvae.data.shards import Shard
from distvae.errors import UserError
from distvae.state import Schedule, TrainState, check_resume, fingerprint, kind_of, same_dataset


def flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys += flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return keys


def test_every_config_key_is_declared_safe_costly_data_or_model():
    undeclared = [key for key in flat_keys(Config().to_dict()) if kind_of(key) is None]
    assert undeclared == [], f"declare these in distvae/state.py: {undeclared}"
    assert kind_of("train.lr") == "safe" and kind_of("run.seed") == "data" and kind_of("loss.kl_weight") == "data"
    assert kind_of("model.latent_dim") == "model" and kind_of("data.global_batch") == "cost"


def saved(**overrides) -> dict:
    return load_config("tiny", [f"{key}={value}" for key, value in overrides.items()]).to_dict()


def current(**overrides) -> Config:
    return load_config("tiny", [f"{key}={value}" for key, value in overrides.items()])


def test_safe_changes_are_each_named_in_one_line():
    notes = check_resume(saved(), current(**{"train.lr": 5e-4, "data.num_workers": 0, "train.max_steps": 99}))
    assert len(notes) == 3
    assert any(note.startswith("train.lr: 0.002 -> 0.0005") and "rescaled" in note for note in notes)
    assert any(note.startswith("train.max_steps") and "continues" in note for note in notes)
    assert check_resume(saved(), current()) == []


@pytest.mark.parametrize("key, value", [("run.seed", 7), ("loss.kl_weight", 0.5), ("data.crop", "168"),
                                        ("data.shuffle_block", 1024), ("loss.recon", "bce")])
def test_data_seed_and_loss_changes_are_refused_unless_reset_data(key, value):
    with pytest.raises(UserError, match=f"^{key}: .* pass --reset-data"):
        check_resume(saved(), current(**{key: value}))
    (note,) = check_resume(saved(), current(**{key: value}), reset_data=True)
    assert note.startswith(key) and note.endswith("(--reset-data)")


def test_a_model_change_is_refused_even_with_reset_data():
    with pytest.raises(UserError, match="^model.latent_dim: .*another model"):
        check_resume(saved(), current(**{"model.latent_dim": 8}), reset_data=True)


def test_an_undeclared_key_cannot_slip_through(monkeypatch):
    tree = saved()
    tree["train"]["new_knob"] = 1
    cfg = current()

    @dataclasses.dataclass
    class Wider:  # a config that grew a key nobody declared in state.py
        def to_dict(self):
            out = cfg.to_dict()
            out["train"]["new_knob"] = 2
            return out

    monkeypatch.setattr("distvae.state.config_from_dict", lambda tree: cfg)
    with pytest.raises(UserError, match="train.new_knob: 1 -> 2 on resume, and train.new_knob is not declared safe"):
        check_resume(tree, Wider())


def test_keys_an_older_checkpoint_lacked_are_not_compared():
    tree = saved()
    del tree["data"]["shuffle_block"], tree["data"]["global_batch"]
    assert check_resume(tree, current(**{"data.shuffle_block": 1024})) == []


def factors(schedule: Schedule, steps) -> list[float]:
    return [schedule(step) for step in steps]


def test_a_longer_run_continues_the_cosine_from_where_it_was():
    old = current(**{"train.max_steps": 100, "train.warmup_steps": 10})
    new = current(**{"train.max_steps": 200, "train.warmup_steps": 10})
    at = 60
    anchor = {"step": at, "factor": Schedule(old)(at)}
    schedule = Schedule(new, anchor)
    assert schedule(at) == pytest.approx(Schedule(old)(at), abs=1e-12)  # no jump at the resume
    steps = list(range(at, 201))
    values = factors(schedule, steps)
    jumps = [abs(b - a) for a, b in zip(values, values[1:])]
    assert max(jumps) < 0.01 and values[-1] == pytest.approx(new.train.min_lr_ratio)
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))  # still decaying
    # Control: the new schedule applied from scratch would jump at the resume step.
    assert abs(Schedule(new)(at) - Schedule(old)(at)) > 0.1
    # Before the anchor the old shape holds (what the checkpoint's steps were trained with).
    assert schedule(at - 1) == Schedule(new)(at - 1)


def test_a_longer_warmup_warms_up_from_the_current_factor():
    old = current(**{"train.max_steps": 100, "train.warmup_steps": 10})
    new = current(**{"train.max_steps": 100, "train.warmup_steps": 30})
    schedule = Schedule(new, {"step": 5, "factor": Schedule(old)(5)})
    assert schedule(5) == pytest.approx(0.6) and schedule(30) == pytest.approx(1.0)
    assert schedule(100) == pytest.approx(new.train.min_lr_ratio)
    constant = Schedule(current(**{"train.lr_schedule": "constant"}), {"step": 50, "factor": 0.4})
    assert constant(50) == constant(500) == 0.4


def test_fingerprint_follows_content_not_paths():
    shards = [Shard(f"/a/s-{i}.tar", 100, None, f"{i:064x}") for i in range(3)]
    moved = [Shard(f"/local/disk/s-{i}.tar", 100, None, f"{i:064x}") for i in range(3)]
    changed = [Shard(f"/a/s-{i}.tar", 100, None, f"{i + 1:064x}") for i in range(3)]
    assert fingerprint(shards) == fingerprint(moved)
    assert fingerprint(shards) != fingerprint(changed)
    assert same_dataset(fingerprint(shards), fingerprint(moved)) == (True, "")
    assert same_dataset(fingerprint(shards), fingerprint(changed))[0] is False
    no_checksums = [Shard(f"/b/s-{i}.tar", 100) for i in range(3)]
    same, notice = same_dataset(fingerprint(shards), fingerprint(no_checksums))
    assert same and "only their sample counts" in notice
    assert same_dataset(fingerprint(shards), fingerprint(no_checksums[:2]))[0] is False
    assert fingerprint(shards) != fingerprint(shards[::-1][:1] + shards[1:])  # another order is another plan


def test_format_1_state_converts_with_a_notice():
    old = {"step": 40, "samples_seen": 1280, "bad_steps": 1, "stream": {"epoch": 2, "batch": 3}, "world_size": 2,
           "batch_size": 16, "tracker_run_id": "abc", "config": saved()}
    state, notes = TrainState.from_json(old)
    assert (state.step, state.samples_seen, state.bad_steps, state.tracker_run_id) == (40, 1280, 1, "abc")
    assert state.data == {"epoch": 2, "batch": 3} and state.global_batch == 32 and state.dataset == ""
    assert len(notes) == 1 and "predates the global data order" in notes[0]
    again, notes = TrainState.from_json(state.to_json() | {"format": 2})
    assert again == state and notes == []


def test_a_global_batch_the_processes_do_not_divide_is_refused_naming_the_keys():
    from distvae.train import accumulation_steps

    assert accumulation_steps(current(**{"data.global_batch": 64, "data.batch_size": 16}), 2) == 2
    assert accumulation_steps(current(**{"data.batch_size": 16, "train.grad_accum_steps": 3}), 2) == 3  # 0: derived
    with pytest.raises(UserError, match=r"^data.global_batch=48 is not a multiple of 2 processes x "
                                        r"data.batch_size=16: change data.global_batch or data.batch_size$"):
        accumulation_steps(current(**{"data.global_batch": 48, "data.batch_size": 16}), 2)
