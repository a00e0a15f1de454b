"""Config system: YAML + dotted overrides, refusal of unknown keys and wrong types."""
from pathlib import Path

import pytest
import yaml

from stackgan.config import REMOVED, ConfigError, changed_by_removal, drop_removed, dump_config, load_config, to_dict

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.stage in (1, 2)
    if cfg.model.stage == 2:
        assert cfg.model.stage1_export


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["optim.lr_g=5e-4", "model.stage=2", "model.spectral_norm=true",
                             "data.emb_k=4", "train.run_dir=/x/y", "model.gf_dim=64"])
    assert cfg.optim.lr_g == pytest.approx(5e-4) and isinstance(cfg.optim.lr_g, float)
    assert cfg.model.stage == 2 and cfg.model.spectral_norm is True
    assert cfg.data.emb_k == 4 and cfg.train.run_dir == "/x/y" and cfg.model.gf_dim == 64


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
    ("data.emb_k=0", "data.emb_k"),
    ("loss.contrastive_coef=-1", "loss.contrastive_coef"),
    ("loss.contrastive_bank=64", "loss.contrastive_bank"),
    ("loss.contrastive_bank=-1", "loss.contrastive_bank"),
    ("loss.class_coef=-1", "loss.class_coef"),
    ("loss.attr_coef=-1", "loss.attr_coef"),
    ("loss.recon_coef=1", "stage-II options"),
    ("model.upsample_skip=true", "stage-II options"),
    ("loss.ms_coef=1", "loss.ms_coef was retired"),
    ("loss.contrastive_temp=0.2", "loss.contrastive_temp was removed"),
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


def test_include_starts_from_another_file(tmp_path):
    """``include:`` applies the named file (relative to the including one) first; the rest of the
    file and the overrides go on top; an error names the included file; a cycle is refused."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"gf_dim": 32, "df_dim": 16}}))
    (tmp_path / "sub" / "alias.yaml").write_text("include: ../base.yaml\nmodel:\n  df_dim: 8\n")
    cfg = load_config(tmp_path / "sub" / "alias.yaml", ["model.z_dim=7"])
    assert (cfg.model.gf_dim, cfg.model.df_dim, cfg.model.z_dim) == (32, 8, 7)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"gfdim": 32}}))
    with pytest.raises(ConfigError, match=r"base.yaml: unknown config key 'model.gfdim'"):
        load_config(tmp_path / "sub" / "alias.yaml")
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")


def test_roundtrip_and_dump(tmp_path):
    cfg = load_config(CONFIGS[0], ["optim.lr_g=1e-3"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_removed_options_in_saved_configs():
    """A checkpoint's config that set a removed option to something today's code does not do
    is named; one that left it at the value that behaves as today is not; an export's model
    section sheds the removed keys (none of them changed a generator)."""
    old = {"loss": {"r1_gamma": 0.0, "ms_coef": 0.5, "uncond_coef": 1.0, "contrastive_temp": 0.2},
           "model": {"d_projection": False, "contrastive_dim": 128, "gf_dim": 32}}
    notes = changed_by_removal(old)
    assert len(notes) == 2 and "loss.ms_coef was retired" in notes[0] and "ms_coef=0.5" in notes[0]
    assert "loss.contrastive_temp was removed" in notes[1]
    assert drop_removed(old["model"], "model") == {"gf_dim": 32}
    assert changed_by_removal(to_dict(load_config(CONFIGS[0]))) == []
    assert all(k.split(".")[0] in ("data", "model", "loss", "optim", "train") for k in REMOVED)
