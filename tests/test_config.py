"""The config tree: TOML + overrides, validation with messages that name the key."""

import tomllib

import pytest

from aol_dist.config import ConfigError, Config, load_config, to_toml


def test_defaults_are_the_papers():
    c = Config().validate()
    assert (c.method.meta_lr, c.method.lr, c.method.k, c.method.threshold) == (0.2, 1e-4, 50.0, 0.5)
    assert c.data.batch_size == 32 and c.method.combine == "text" and c.model.arch == "resnet50"


def test_file_then_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[train]\nsteps = 5\n[data]\neval_splits = ["test", "validate"]\n')
    c = load_config(p, ["train.steps=9", "method.k=25", "data.label_sets=negbio_u0,chexpert_u1"])
    assert c.train.steps == 9 and c.method.k == 25.0
    assert c.data.eval_splits == ("test", "validate")
    assert c.data.label_sets == ("negbio_u0", "chexpert_u1")


@pytest.mark.parametrize("override,message", [
    ("train.stepz=3", r"train\.: unknown keys \['stepz'\]"),
    ("train.steps=abc", "train.steps: cannot read 'abc' as int"),
    ("method.combine=median", "method.combine must be text or listing"),
    ("model.arch=vgg", "model.arch must be one of"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("nosection", "expected section.key=value"),
    ("method.lr=-1e-3", r"method\.lr must be > 0, got -0\.001"),
    ("method.meta_lr=0", r"method\.meta_lr must be > 0"),
    ("method.attention_lr=-1", r"method\.attention_lr must be >= 0"),
    ("method.regimes=0", r"method\.regimes must be 1 to 8, got 0"),
    ("train.grad_compression=int8", r"train\.grad_compression must be one of none, bf16, fp16, got 'int8'"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_written_config_round_trips(tmp_path):
    c = load_config(None, ["train.steps=3", "data.eval_splits=test"])
    text = to_toml(c, "abc123")
    assert text.startswith("# git revision: abc123")
    p = tmp_path / "config.toml"
    p.write_text(text)
    assert load_config(p) == c
    assert tomllib.loads(text)["train"]["steps"] == 3


def test_a_run_written_before_a_key_existed_loads_with_what_it_trained(tmp_path):
    """``aol eval`` / ``aol audit`` of a run from before method.regimes: one regime, as it trained (today's
    default, 2, would rebuild another model and fail on its checkpoint)."""
    from aol_dist.config import load_run_config

    text = to_toml(load_config(None, ["method.regimes=2"]), "abc123")
    old = tmp_path / "old.toml"
    old.write_text("\n".join(line for line in text.splitlines() if not line.startswith("regimes")))
    assert load_config(old).method.regimes == 2 and load_run_config(old).method.regimes == 1
    new = tmp_path / "new.toml"
    new.write_text(text)
    assert load_run_config(new).method.regimes == 2


def test_resume_takes_a_key_the_checkpoint_predates_as_what_the_run_trained_with():
    """A checkpoint written before method.regimes existed trained with one regime: it resumes with
    method.regimes=1 and is refused under today's default (2 regimes would be another model)."""
    from aol_dist.checkpoint import config_changes

    saved = load_config(None, ["method.regimes=1"]).to_dict()
    del saved["method"]["regimes"]
    assert config_changes(saved, load_config(None, ["method.regimes=1"]).to_dict()) == []
    assert config_changes(saved, load_config(None).to_dict()) == ["method.regimes"]
