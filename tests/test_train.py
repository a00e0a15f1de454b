"""The trainer end to end on real shards: stage I -> export -> stage II, resume, signals, DDP."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stackgan import checkpoint as ckpt
from stackgan.data.meta import ShardError, load_metadata
from stackgan.export import load_generator, read_export

from .conftest import ROOT, run_cmd

TINY = ["model.gf_dim=16", "model.df_dim=8", "model.z_dim=16", "model.cond_dim=16", "model.r_num=1",
        "data.batch_size=4", "data.num_workers=0", "train.log_every=2", "train.sample_every=5",
        "optim.ema_decay=0.9"]


def train_args(shards: Path, run_dir: Path, *extra: str, config: str = "configs/birds_stage1.yaml") -> list[str]:
    return [sys.executable, "-m", "stackgan.train", "--config", config, f"data.shards={shards}",
            f"train.run_dir={run_dir}", *TINY, *extra]


def kill_at_checkpoint(cmd: list[str], run: Path, n: int) -> None:
    """Start a training command and SIGKILL it as soon as checkpoint ``n`` appears in ``run``
    (before it can finish); the newest complete checkpoint is then ``n``."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = run / "checkpoints" / f"step-{n:08d}"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "COMPLETE").exists(), "the run finished before it could be killed; raise n"
    assert ckpt.latest(run) == target, proc.stderr.read()[-3000:]


def log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def final_state(run_dir: Path) -> dict:
    path = ckpt.latest(run_dir)
    assert path is not None, f"no complete checkpoint in {run_dir}"
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)


def assert_same_state(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a["step"] == b["step"]
    for part in ("G", "D", "ema"):
        pa, pb = (a[part], b[part]) if part != "ema" else (a[part]["model"], b[part]["model"])
        assert pa.keys() == pb.keys()
        for k in pa:
            ta, tb = pa[k], pb[k]
            if ta.dtype.is_floating_point:
                assert torch.allclose(ta, tb, atol=atol, rtol=0), f"{part}.{k} differs by {(ta - tb).abs().max()}"
            else:
                assert torch.equal(ta, tb), f"{part}.{k} differs"
    for opt in ("opt_g", "opt_d"):
        for sid, s in a[opt]["state"].items():
            for k, v in s.items():
                assert torch.allclose(v.float(), b[opt]["state"][sid][k].float(), atol=atol, rtol=0), f"{opt}[{sid}].{k}"


def test_stage1_then_stage2(tiny_shards, tmp_path):
    s1 = tmp_path / "s1"
    p = run_cmd(train_args(tiny_shards, s1, "train.steps=10", "train.ckpt_every=3",
                           "train.metrics=diversity", "train.metrics_every=5"))
    assert p.returncode == 0, p.stderr[-3000:]
    # run folder: resolved config, logs, TensorBoard, grids, kept checkpoints, export, marker
    assert (s1 / "config.yaml").is_file() and (s1 / "COMPLETE").is_file()
    assert (s1 / "samples" / "reals.png").is_file() and (s1 / "samples" / "step-00000010.png").is_file()
    assert list((s1 / "tb").iterdir())
    assert [c.name for c in ckpt.list_complete(s1)] == ["step-00000006", "step-00000009", "step-00000010"]  # last 3
    recs = log_records(s1)
    steps = [r["step"] for r in recs if "loss_d" in r]
    assert steps == [2, 4, 6, 8, 10]
    assert any("diversity" in r for r in recs) and any("d_real" in r for r in recs)
    snaps = [json.loads(line) for line in (s1 / "metrics.jsonl").read_text().splitlines()]
    assert [(r["metric"], r["step"]) for r in snaps] == [("diversity", 5), ("diversity", 10)]
    g1, info = load_generator(s1 / "export" / "generator.pt")
    assert info.stage == 1 and info.image_size == 64 and info.step == 10
    assert info.path == str(s1 / "export" / "generator.safetensors")  # the old .pt path resolves to it
    with torch.no_grad():
        img, mu, logvar = g1(torch.randn(2, info.text_dim), torch.randn(2, info.z_dim))
    assert img.shape == (2, 3, 64, 64)

    # resuming a run folder with other networks is refused clearly, and loses nothing
    p = run_cmd(train_args(tiny_shards, s1, "train.steps=12", "model.gf_dim=32"))
    assert p.returncode == 2 and "model.gf_dim: 16 in the checkpoint, 32 now" in p.stderr, p.stderr[-2000:]
    p = run_cmd(train_args(tiny_shards, s1, "train.steps=12", "model.gf_dim=32", "--resume", "force"))
    assert p.returncode == 2 and "other networks" in p.stderr, p.stderr[-2000:]  # forced, but cannot fit
    assert [c.name for c in ckpt.list_complete(s1)] == ["step-00000006", "step-00000009", "step-00000010"]

    s2 = tmp_path / "s2"
    export1 = s1 / "export" / "generator.pt"
    p = run_cmd(train_args(tiny_shards, s2, "train.steps=3", "train.ckpt_every=2", "data.batch_size=2",
                           f"model.stage1_export={export1}", "train.sample_every=3",
                           config="configs/birds_stage2.yaml"))
    assert p.returncode == 0, p.stderr[-3000:]
    g2, info2 = load_generator(s2 / "export" / "generator.pt")
    assert info2.stage == 2 and info2.image_size == 256
    # the frozen stage-I generator inside stage II never changed
    s1_weights = read_export(export1)["state_dict"]
    final = final_state(s2)
    for name, state in (("G", final["G"]), ("ema", final["ema"]["model"])):
        for k, v in s1_weights.items():
            assert torch.equal(state[f"stage1.{k}"], v), f"{name}: stage1.{k} changed during stage II"


RESUME_N = 8  # the SIGKILL-resume runs: 2 x RESUME_N steps, a checkpoint every RESUME_N


@pytest.fixture(scope="module")
def straight_run(tiny_shards, tmp_path_factory) -> Path:
    """The uninterrupted reference of the SIGKILL-resume tests (TINY's 0 loader workers): the
    stream's batch k is a pure function of seed, rank, world and k, not of the loader workers,
    so one reference serves every worker count (tests/test_storage.py relies on it as well)."""
    run = tmp_path_factory.mktemp("straight") / "ref"
    p = run_cmd(train_args(tiny_shards, run, f"train.steps={2 * RESUME_N}", f"train.ckpt_every={RESUME_N}"))
    assert p.returncode == 0, p.stderr[-3000:]
    return run


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_after_sigkill(tiny_shards, tmp_path, workers, straight_run):
    n = RESUME_N
    common = [f"train.steps={2 * n}", f"train.ckpt_every={n}", f"data.num_workers={workers}"]
    ref = straight_run

    run = tmp_path / "killed"
    kill_at_checkpoint(train_args(tiny_shards, run, *common), run, n)
    p = run_cmd(train_args(tiny_shards, run, *common, "--resume", "auto"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout
    assert_same_state(final_state(ref), final_state(run))


def test_sigterm_saves_and_exits_for_requeue(tiny_shards, tmp_path):
    run = tmp_path / "term"
    args = train_args(tiny_shards, run, "train.steps=100000", "train.ckpt_every=100000", "train.log_every=1")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "log.jsonl").exists() or not (run / "log.jsonl").read_text().count("\n") >= 3:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    path = ckpt.latest(run)
    assert path is not None
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    logged = max(r["step"] for r in log_records(run) if "loss_d" in r)
    assert state["step"] >= logged and state["step"] < 100000
    assert (path / "rng-rank0.pt").is_file()


def test_sigterm_to_the_process_group_with_loader_workers(tiny_shards, tmp_path):
    """What Slurm does on preemption, requeue, scancel and the time limit: the stop signal goes to
    every process of the job, the trainer's loader workers included. The trainer (not a dead
    worker) decides: checkpoint at the step it reached, status 3, and the resumed run neither
    loses nor repeats a step."""
    run = tmp_path / "group"
    common = ["train.ckpt_every=100000", "train.log_every=1", "data.num_workers=2"]
    proc = subprocess.Popen(train_args(tiny_shards, run, "train.steps=100000", *common), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while len([r for r in (log_records(run) if (run / "log.jsonl").exists() else []) if "loss_d" in r]) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the trainer and both loader workers
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    assert "DataLoader worker" not in err and "signal SIGTERM: checkpoint" in out, err[-3000:]
    with pytest.raises(ProcessLookupError):  # no worker outlived the trainer
        os.killpg(proc.pid, 0)
    stopped = [r for r in log_records(run) if r.get("event") == "checkpointed"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM"
    step = stopped[0]["step"]
    assert ckpt.step_of(ckpt.latest(run)) == step and max(r["step"] for r in log_records(run)) == step
    p = run_cmd(train_args(tiny_shards, run, f"train.steps={step + 3}", *common))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"at step {step}" in p.stdout
    assert [r["step"] for r in log_records(run) if "loss_d" in r] == list(range(1, step + 4))


def test_bad_input_exits_2_before_training(tiny_shards, tmp_path):
    p = run_cmd(train_args(tiny_shards, tmp_path / "x", "loss.ms_coef=1", "train.steps=2"))
    assert p.returncode == 2 and "loss.ms_coef was retired" in p.stderr and "docs/quality.md" in p.stderr
    p = run_cmd(train_args(tiny_shards, tmp_path / "x", "train.metrics=diversity,nonsense", "train.steps=2"))
    assert p.returncode == 2 and "nonsense" in p.stderr
    p = run_cmd(train_args(tmp_path / "nowhere", tmp_path / "y", "train.steps=2"))
    assert p.returncode == 2 and "metadata.json" in p.stderr
    p = run_cmd(train_args(tiny_shards, tmp_path / "z", "model.stage=2", "train.steps=2",
                           f"model.stage1_export={tmp_path}/missing.pt"))
    assert p.returncode == 2 and "missing.pt" in p.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_bf16_autocast_on_cpu(tiny_shards, tmp_path):
    run = tmp_path / "bf16"
    p = run_cmd(train_args(tiny_shards, run, "train.steps=2", "train.mixed_precision=bf16", "train.log_every=1"))
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [r for r in log_records(run) if "loss_d" in r]
    assert len(recs) == 2 and all(abs(r["loss_d"]) < 1e4 and abs(r["loss_g"]) < 1e4 for r in recs)


def test_recipe_options_train(tiny_shards, tmp_path):
    run = tmp_path / "con"
    p = run_cmd(train_args(tiny_shards, run, "train.steps=3", "train.log_every=1", "loss.contrastive_coef=1.0",
                           "model.d_cond=text", "loss.contrastive_bank=16", "loss.class_coef=1",
                           "loss.attr_coef=1"))
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [r for r in log_records(run) if "loss_d" in r]
    assert len(recs) == 3
    assert all(0 < r["loss_contrastive_real"] < 10 and 0 < r["loss_contrastive_fake"] < 10 for r in recs)
    assert all(0 < r["loss_class_real"] < 10 and 0 < r["loss_class_fake"] < 10 for r in recs)
    assert all(0 < r["loss_attr_real"] < 10 and 0 <= r["loss_attr_fake"] < 10 for r in recs)
    assert any(r["loss_attr_fake"] > 0 for r in recs)  # the tiny set's captions state some groups
    state = final_state(run)
    meta = load_metadata(tiny_shards)
    assert state["D"]["attributes.weight"].shape == (len(meta.attributes), 8 * 8 * 16)  # the 4x4 code of D 8
    n_train = len(meta.splits["train"].classes)
    assert state["D"]["classify.weight"].shape[0] == n_train  # one logit per training species
    assert state["D"]["img_code.weight"].shape[0] == 128
    bank = torch.load(ckpt.latest(run) / "rng-rank0.pt", weights_only=False)["extra"]["bank"]
    assert bank["n"] == 12 and (bank["cls"][:12] >= 0).all()  # 3 batches of 4, kept for a resume


def test_checkpoint_with_a_retired_option_is_refused(tiny_shards, tmp_path, tiny_stage1_run):
    """A run whose saved config used an option that no longer exists cannot silently continue
    without it; the checkpoint is left as it was."""
    run = tmp_path / "old"
    shutil.copytree(tiny_stage1_run, run)  # a 2-step run (its run_dir is the copy's: paths are not compared)
    path = ckpt.latest(run)
    state = torch.load(path / "state.pt", weights_only=False)
    state["config"]["loss"]["r1_gamma"] = 1.0  # as a run of an earlier version would have saved it
    torch.save(state, path / "state.pt")
    p = run_cmd(train_args(tiny_shards, run, "train.steps=4"))
    assert p.returncode == 2 and "loss.r1_gamma was retired" in p.stderr and "r1_gamma=1.0" in p.stderr, p.stderr
    assert ckpt.latest(run) == path


def test_fp16_on_cpu_says_it_runs_fp32(tiny_shards, tmp_path):
    p = run_cmd(train_args(tiny_shards, tmp_path / "fp16", "train.steps=1", "train.mixed_precision=fp16"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "runs in fp32" in p.stdout + p.stderr


@pytest.mark.distributed
def test_two_processes_accelerate_launch(tiny_shards, tmp_path):
    run = tmp_path / "ddp"
    args = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu_2proc.yaml",
            "--main_process_port", "29561", "-m", "stackgan.train", "--config", "configs/birds_stage1.yaml",
            f"data.shards={tiny_shards}", f"train.run_dir={run}", *TINY, "train.steps=6", "train.ckpt_every=3",
            "loss.contrastive_bank=8",  # each rank's own bank, D still in sync
            "loss.class_coef=1"]  # the species head is used on real images only, yet reduced in sync
    p = run_cmd(args, env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    fin = [r for r in log_records(run) if r.get("event") == "finished"]
    assert fin and fin[-1]["world_size"] == 2
    assert len(fin[-1]["fingerprints"]) == 2 and fin[-1]["ranks_identical"], fin[-1]
    banks = [torch.load(ckpt.latest(run) / f"rng-rank{r}.pt", weights_only=False)["extra"]["bank"] for r in (0, 1)]
    assert all(b["n"] == 8 for b in banks) and not torch.equal(banks[0]["emb"], banks[1]["emb"])


def test_loader_workers_fit_the_machine(monkeypatch):
    """-1 sizes the loader from the CPUs this process may use, shared by the node's processes;
    an explicit count is kept."""
    from stackgan.run import loader_workers

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for k in ("SLURM_STEP_ID", "SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert loader_workers(3, gpu) == 3
    assert loader_workers(-1, gpu) == 8  # capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers(-1, gpu) == 3  # 4 CPUs each, one for the step
    assert loader_workers(-1, cpu) == 1
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert loader_workers(-1, gpu) == 5  # an srun task's own CPUs
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert loader_workers(-1, gpu) == 1 and loader_workers(-1, cpu) == 0


def _one_step(overrides: list[str], lr_d: float = 1e-3, stage: int = 1, stated: torch.Tensor | None = None):
    """One gan_step of a tiny pair from fixed weights and inputs; returns its StepOut. With
    ``loss.class_coef`` D gets a 3-species head and the batch species 0, 1, 2, 0, 1, 2; with
    ``loss.attr_coef`` a head of two 2-value groups, labels alternating and every group
    stated unless ``stated`` says otherwise. Stage II refines a fresh tiny stage-I generator."""
    from accelerate import Accelerator

    from stackgan.config import load_config
    from stackgan.models import CODE_DIM, build_discriminator, build_generator
    from stackgan.backends import AccelerateGAN
    from stackgan.step import Batch, gan_step, needs_words
    from stackgan.words import word_vectors

    cfg = load_config(None, ["model.gf_dim=8", "model.df_dim=8", "model.z_dim=8", "model.cond_dim=8",
                             "model.d_cond=text", "loss.contrastive_coef=1.0", f"model.stage={stage}", *overrides])
    torch.manual_seed(0)
    stage1 = build_generator(load_config(None, ["model.gf_dim=8", "model.z_dim=8", "model.cond_dim=8"]).model, 12)
    G = build_generator(cfg.model, 12, stage1=stage1 if stage == 2 else None)
    classes = 3 if cfg.loss.class_coef > 0 else 0
    n_attr = 4 if cfg.loss.attr_coef > 0 else 0
    D = build_discriminator(cfg.model, 12, code_dim=CODE_DIM, num_classes=classes, num_attributes=n_attr,
                            word_codes=cfg.loss.word_coef > 0)
    opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters(), lr=lr_d)
    acc = Accelerator(cpu=True)
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    size = 64 if stage == 1 else 256
    real = torch.rand(6, 3, size, size) * 2 - 1
    low = torch.nn.functional.interpolate(real, size=(64, 64), mode="area") if cfg.loss.recon_coef > 0 else None
    attr = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]] * 3, dtype=torch.uint8) if n_attr else None
    if n_attr and stated is None:
        stated = torch.ones(6, 4, dtype=torch.bool)
    batch = Batch(real=real, emb=torch.randn(6, 12), z=torch.randn(6, 8), wrong=torch.roll(torch.arange(6), 1),
                  cls=torch.arange(6), species=torch.arange(6) % 3 if classes else None, real_low=low,
                  attr=attr, stated=stated, attr_groups=[[0, 1], [2, 3]] if n_attr else None,
                  words=word_vectors(WORD_CAPTIONS) if needs_words(cfg, G) else None)
    return gan_step(AccelerateGAN(acc, grad_clip=cfg.optim.grad_clip), G, D, opt_g, opt_d, batch, cfg)


WORD_CAPTIONS = ["a small yellow bird with black wings", "this bird has a red crown", "a grey bird",
                 "a bird with a long needle-shaped bill and a white belly", "blue wings", "a tiny brown bird"]


def _weighs_real_and_fake_terms(key: str, term: str, *extra: str):
    """Steps at ``key`` = 1 and 2 (D held still: lr 0; ``extra`` overrides in both): D's loss
    carries coef x ``loss_<term>_real``, G's coef x ``loss_<term>_fake``, and nothing else
    changes. Returns the coef-1 step."""
    one, two = _one_step([f"{key}=1", *extra], lr_d=0.0), _one_step([f"{key}=2", *extra], lr_d=0.0)
    real, fake = one.stats[f"loss_{term}_real"], one.stats[f"loss_{term}_fake"]
    assert torch.equal(real, two.stats[f"loss_{term}_real"])
    assert torch.equal(fake, two.stats[f"loss_{term}_fake"])
    assert 0 < real < 10 and 0 < fake < 10
    assert torch.allclose(two.loss_d - one.loss_d, real, atol=1e-5)
    assert torch.allclose(two.loss_g - one.loss_g, fake, atol=1e-5)
    return one


def test_class_coef_weighs_the_species_terms_of_d_and_g():
    """The species loss on real images (D) and on G's fakes (G)."""
    _weighs_real_and_fake_terms("loss.class_coef", "class")


def test_attr_coef_weighs_the_attribute_terms_and_g_answers_for_stated_groups_only():
    """The attribute loss on real images (D) and on G's fakes over the groups the captions state
    (G); with nothing stated G's term is 0 and D's is unchanged."""
    one = _weighs_real_and_fake_terms("loss.attr_coef", "attr")
    real, fake = one.stats["loss_attr_real"], one.stats["loss_attr_fake"]
    mute = _one_step(["loss.attr_coef=1"], lr_d=0.0, stated=torch.zeros(6, 4, dtype=torch.bool))
    assert mute.stats["loss_attr_fake"] == 0 and torch.equal(mute.stats["loss_attr_real"], real)
    half = torch.zeros(6, 4, dtype=torch.bool)
    half[:, :2] = True  # the first group only
    assert 0 < _one_step(["loss.attr_coef=1"], lr_d=0.0, stated=half).stats["loss_attr_fake"] != fake
    assert "loss_attr_real" not in _one_step([]).stats


def test_word_coef_weighs_the_word_region_terms_of_d_and_g():
    """The word-region loss on real pairs (D) and on G's fakes (G), which read their words."""
    _weighs_real_and_fake_terms("loss.word_coef", "word", "model.word_attn=true")
    assert "loss_word_real" not in _one_step([]).stats


def test_attr_coef_needs_shards_with_attributes(tmp_path):
    """Refused before any model is built, naming the shards and the key."""
    from stackgan.config import load_config
    from stackgan.run import check_inputs

    from .test_stream import write_shards

    root = write_shards(tmp_path / "plain")
    cfg = load_config("configs/birds_stage1.yaml", [f"data.shards={root}", "loss.attr_coef=1",
                                                    "train.metrics="])
    with pytest.raises(ShardError, match=r"loss.attr_coef=1.0 needs attribute labels.*lists no attributes"):
        check_inputs(cfg)


def test_recon_coef_weighs_stage2_reconstruction_in_g_loss_only():
    """Stage II: G's loss carries coef x the L1 of its refinement of the real 64-px crops; D's
    step does not read it; stage I refuses the option."""
    one = _one_step(["loss.recon_coef=1", "model.upsample_skip=true"], lr_d=0.0, stage=2)
    two = _one_step(["loss.recon_coef=3", "model.upsample_skip=true"], lr_d=0.0, stage=2)
    rec = one.stats["loss_recon"]
    assert torch.equal(rec, two.stats["loss_recon"]) and 0 < rec < 2
    assert torch.equal(one.loss_d, two.loss_d)
    assert torch.allclose(two.loss_g - one.loss_g, 2 * rec, atol=1e-5)
    assert "loss_recon" not in _one_step(["model.upsample_skip=true"], stage=2).stats
    from stackgan.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="stage-II options"):
        load_config(None, ["loss.recon_coef=1"])


def test_class_index_maps_training_classes_only(tiny_shards):
    from stackgan.data.meta import load_metadata
    from stackgan.run import class_index

    meta = load_metadata(tiny_shards)
    classes = sorted(meta.splits["train"].classes)
    lut = class_index(meta)
    assert lut[torch.tensor(classes)].tolist() == list(range(len(classes)))
    others = [c for c in range(len(lut)) if c not in classes]
    assert (lut[torch.tensor(others, dtype=torch.long)] == -1).all()


def test_fp16_loss_scaling_skips_an_inf_step_and_logs_it():
    """The trainer's step with a real GradScaler (torch's CPU one in place of the CUDA one that
    Accelerate makes on a GPU; tests/test_amp.py): a step whose D gradients are inf is skipped
    for D only, the skip is in the step's stats, the scale backs off, and the logged grad norm
    is the unscaled one."""
    from stackgan.config import load_config
    from stackgan.models import build_discriminator, build_generator
    from stackgan.backends import AccelerateGAN
    from stackgan.step import Batch, gan_step

    from .test_amp import INIT_SCALE, _accelerator

    cfg = load_config(None, ["model.gf_dim=8", "model.df_dim=8", "model.z_dim=8", "model.cond_dim=8",
                             "model.d_cond=text"])
    batch = Batch(real=torch.rand(6, 3, 64, 64) * 2 - 1, emb=torch.randn(6, 12), z=torch.randn(6, 8),
                  wrong=torch.roll(torch.arange(6), 1), cls=torch.arange(6))
    norms = {}
    for scaled in (False, True):
        torch.manual_seed(0)
        G, D = build_generator(cfg.model, 12), build_discriminator(cfg.model, 12)
        acc = _accelerator(scaled)
        opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
        G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
        acc.native_amp = scaled  # the scaler logic of a GPU run (tests/test_amp.py)
        torch.manual_seed(1)
        out = gan_step(AccelerateGAN(acc), G, D, opt_g, opt_d, batch, cfg, diag=True)
        norms[scaled] = out.grad_norm_d
    assert out.stats["skipped_d"] == 0 and out.stats["skipped_g"] == 0
    # unscaled before the norm: not 2**10 times larger (the scaled run's forward is in reduced
    # precision under Accelerate's CPU autocast: 0.2-0.4% apart, measured)
    torch.testing.assert_close(norms[True], norms[False], rtol=2e-2, atol=0)
    assert acc.scaler.get_scale() == INIT_SCALE

    bad = Batch(**{**batch.__dict__, "real": batch.real.clone()})
    bad.real[0, 0, 0, 0] = float("inf")  # an inf pixel: D's loss and gradients are not finite
    before = [p.detach().clone() for p in acc.unwrap_model(D).parameters()]
    out = gan_step(AccelerateGAN(acc), G, D, opt_g, opt_d, bad, cfg)
    assert out.stats["skipped_d"] == 1
    assert acc.scaler.get_scale() < INIT_SCALE
    assert all(torch.equal(a, b) for a, b in zip(before, acc.unwrap_model(D).parameters()))


def test_stage2_matching_term_is_live(tiny_shards, tmp_path, tiny_stage1_run):
    """A short stage-II run of the demo's config (configs/birds_stage2.yaml, at tiny widths)
    moves D(real) away from D(wrong): its D reads the text at 256 px (the official stage II
    on the embedded set kept them equal, 0.52 / 0.52, for all of the demo's 200 steps)."""
    s1 = tiny_stage1_run  # 2 steps of stage I
    s2 = tmp_path / "s2"
    p = run_cmd(train_args(tiny_shards, s2, "train.steps=100", "data.batch_size=4", "train.log_every=5",
                           "train.sample_every=1000", "train.ckpt_every=1000", "model.df_dim=8", "optim.lr_d=1e-3",
                           f"model.stage1_export={s1 / 'export' / 'generator.pt'}", config="configs/birds_stage2.yaml"))
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [r for r in log_records(s2) if "loss_d" in r]
    gap = [r["d_real"] - r["d_wrong"] for r in recs]
    assert abs(gap[0]) < 0.05, gap  # D starts blind to the text
    assert sum(gap[-4:]) / 4 > 0.15, gap
    assert all(0 < r["loss_recon"] < 1 for r in recs)
