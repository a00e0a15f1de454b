"""Config system: YAML + dotted overrides, refusal of unknown keys and wrong types."""
from pathlib import Path

import pytest
import yaml

from stackgan.config import ConfigError, dump_config, from_dict, load_config, to_dict

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.stage in (1, 2)
    if cfg.model.stage == 2:
        assert cfg.model.stage1_export


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["optim.lr_g=5e-4", "model.stage=2", "model.spectral_norm=true",
                             "data.emb_mode=mean", "train.run_dir=/x/y", "model.gf_dim=64"])
    assert cfg.optim.lr_g == pytest.approx(5e-4) and isinstance(cfg.optim.lr_g, float)
    assert cfg.model.stage == 2 and cfg.model.spectral_norm is True
    assert cfg.data.emb_mode == "mean" and cfg.train.run_dir == "/x/y" and cfg.model.gf_dim == 64


@pytest.mark.parametrize("override, needle", [
    ("optim.lr_gg=1", "optim.lr_gg"),
    ("nonsense.key=1", "nonsense"),
    ("model.gf_dim=abc", "model.gf_dim"),
    ("model.gf_dim=1.5", "model.gf_dim"),
    ("model.spectral_norm=3", "model.spectral_norm"),
    ("loss.kind=wasserstein", "loss.kind"),
    ("model.stage=3", "model.stage"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.num_workers=-2", "data.num_workers"),
    ("optim.lr_d=-1", "optim.lr_d"),
    ("loss.contrastive_coef=1", "model.contrastive_dim"),
    ("loss.contrastive_temp=0", "loss.contrastive_temp"),
    ("loss.contrastive_bank=64", "loss.contrastive_bank"),
    ("loss.contrastive_bank=-1", "loss.contrastive_bank"),
    ("loss.contrastive_fakes=true", "loss.contrastive_fakes"),
    ("loss.contrastive_g_coef=-0.5", "loss.contrastive_g_coef"),
    ("loss.diffaug_shift=-1", "loss.diffaug_shift"),
    ("loss.class_coef=-1", "loss.class_coef"),
    ("loss.r1_gamma=-1", "loss.r1_gamma"),
    ("loss.r1_every=0", "loss.r1_every"),
    ("loss.ms_coef=-1", "loss.ms_coef"),
    ("loss.ms_samples=1", "loss.ms_samples"),
    ("model=3", "model"),
    ("justtext", "key.sub=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_bad_yaml_key_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"model": {"gf_dim": 32, "gfdim": 3}}))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "model.gfdim" in str(e.value) and "bad.yaml" in str(e.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_roundtrip_and_dump(tmp_path):
    cfg = load_config(CONFIGS[0], ["optim.lr_g=1e-3"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)
