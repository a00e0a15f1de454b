"""Generate bird images from text with a trained generator export.

    python -m stackgan.sample --export runs/stage1/export/generator.safetensors \\
        --prompt "this bird has a red crown, blue wings and a white belly" --n 8
    python -m stackgan.sample --export ... --prompts prompts.txt        # one prompt per line
    python -m stackgan.sample --export ... --split test --shards shards/birds-embedded --limit 8

Writes one PNG per image (``p<prompt>_s<sample>.png``), a grid with each prompt written
under its row (``grid.png``) and ``prompts.json`` (what was asked, with which export and
seed) into ``--out`` (default ``<run folder>/generated``). ``--stages`` (stage II) adds
``stages.png``: per prompt one row, per sample three columns: the stage-I image it was
refined from (64 px, shown x4), that image upsampled bicubically (the baseline), stage II.
The export holds the EMA weights when the run used EMA, so those are what is sampled.
Stage I and stage II exports both work; it samples on a GPU when there is one (``--device auto``,
the default; ``--device cpu`` to stay off it).

Free-text prompts are embedded with the text encoder recorded in the export. A generator
trained on embeddings that cannot be computed for new text (CUB's precomputed
char-CNN-RNN), or asked to use an encoder other than its own (``--encoder``), is refused
with a message saying how to get one that can (prepare shards with ``--reembed``).

Reproducible: image (p, s) depends only on the export, prompt p's embedding, ``--seed``,
p and ``--n`` (noise and CA-Net noise are seeded per prompt), so the same command writes
the same bytes (on the same device and library versions).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data.meta import load_metadata
from .errors import StackGANError, report
from .export import ExportInfo, build_from_export, export_info, read_export
from .files import atomic_json
from .grid import save_grid, save_png
from .images import to_uint8, upsample
from .metrics.core import noise, resolve_device, run_generator, seed_of
from .metrics.evalset import load_split
from .text import PrecomputedEncoder, TextEncoder, TextEncoderError, get_encoder

GRID_ROWS = 16  # prompts per grid file
CHUNK = 32  # images per forward pass; fixed, so that results never depend on a batch setting


class SamplingError(StackGANError, RuntimeError):
    """A sampling request that cannot be honoured (says what was asked and how to fix it)."""


@dataclass
class Prompts:
    texts: list[str]
    emb: np.ndarray  # (P, text_dim) float32
    source: str  # "text" | "split:<name>"


def _same(a: str, b: str) -> bool:
    strip = lambda s: s.strip().lower().removeprefix("sentence-transformers/")  # noqa: E731
    return strip(a) == strip(b)


def text_encoder_for(info: ExportInfo, asked: str | None = None) -> TextEncoder:
    """The encoder that embeds free text for this export, or a :class:`SamplingError`."""
    trained = info.text_encoder
    where = info.path or "the export"
    if asked and not _same(asked, trained):
        raise SamplingError(
            f"{where} was trained with text encoder {trained!r}, but --encoder {asked!r} was asked for: a "
            f"generator only understands embeddings of the encoder it was trained with. Drop --encoder to "
            f"use {trained!r}, or train on shards embedded with {asked!r} "
            f"(python shards/prepare.py ... --reembed --encoder {asked}) and sample from that export."
        )
    try:
        enc = get_encoder(trained, info.text_dim)
    except TextEncoderError as e:
        raise SamplingError(f"{where}: cannot embed free text: {e}") from e
    if isinstance(enc, PrecomputedEncoder):
        raise SamplingError(
            f"{where} was trained on {trained!r} text embeddings, which exist only precomputed for the data "
            f"set's captions: free text (--prompt / --prompts) cannot be embedded for this generator. "
            f"To sample from your own text, prepare the shards with the sentence encoder "
            f"(python shards/prepare.py ... --reembed), train on them and sample from that export; "
            f"or sample this one from its data set's captions with --split test --shards DIR."
        )
    if enc.dim != info.text_dim:
        raise SamplingError(f"{where}: encoder {trained!r} gives {enc.dim}-d embeddings, the generator takes "
                            f"{info.text_dim}-d")
    return enc


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    texts = [p.strip() for p in (prompts or [])]
    if prompts_file:
        path = Path(prompts_file)
        if not path.exists() or path.is_dir():
            raise SamplingError(f"prompts file not found: {path}")
        texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if any(not t for t in texts):
        raise SamplingError("empty prompt given")
    return texts


def split_prompts(info: ExportInfo, shards: str, split: str, limit: int, caption_index: int,
                  asked: str | None = None) -> Prompts:
    """Captions and their stored embeddings from ``limit`` samples spread over a split."""
    meta = load_metadata(shards)
    if not _same(meta.encoder, info.text_encoder) or meta.text_dim != info.text_dim:
        raise SamplingError(
            f"the shards at {shards} hold {meta.encoder!r} ({meta.text_dim}-d) embeddings, but "
            f"{info.path or 'the export'} was trained with {info.text_encoder!r} ({info.text_dim}-d); "
            "sample from the shard set it was trained on"
        )
    if asked and not _same(asked, info.text_encoder):
        raise SamplingError(f"--encoder {asked!r} differs from the export's encoder {info.text_encoder!r}")
    if limit <= 0:
        raise SamplingError(f"--limit must be > 0, got {limit}")
    data = load_split(meta, split, attributes=False)
    if not 0 <= caption_index < data.emb.shape[1]:
        raise SamplingError(f"--caption-index must be in [0, {data.emb.shape[1]}), got {caption_index}")
    idx = np.unique(np.linspace(0, len(data) - 1, min(limit, len(data))).round().astype(int))
    texts = [data.captions[i][caption_index] for i in idx]
    return Prompts(texts, data.emb[idx, caption_index], f"split:{split}")


@torch.no_grad()
def generate_images(G: torch.nn.Module, emb: np.ndarray, n: int, seed: int, z_dim: int,
                    device: str | torch.device = "cpu", texts: list[str] | None = None) -> torch.Tensor:
    """(P, n, 3, S, S) images in [-1,1] on the CPU. Prompt p's images come from noise seeded
    by (seed, p) in fixed chunks of :data:`CHUNK`, so they do not depend on other prompts.
    ``texts``: the prompts' texts (a generator with ``model.word_attn`` reads their words)."""
    dev = torch.device(device)
    out = []
    for p in range(len(emb)):
        z = noise(n, z_dim, seed, p)
        e = torch.as_tensor(emb[p], dtype=torch.float32).expand(n, -1)
        imgs = [run_generator(G, e[lo : lo + CHUNK].to(dev), z[lo : lo + CHUNK].to(dev), seed_of(seed, p, lo, 2),
                              None if texts is None else [texts[p]] * len(e[lo : lo + CHUNK])).cpu()
                for lo in range(0, n, CHUNK)]
        out.append(torch.cat(imgs))
    return torch.stack(out)


def default_out(export: str | Path) -> Path:
    parent = Path(export).resolve().parent
    return (parent.parent if parent.name == "export" else parent) / "generated"


STAGES_LEGEND = "per sample: stage I (64 px, shown x4) | stage I upsampled bicubically | stage II"


def stage_columns(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(P, n, 3, 64, 64) stage-I and (P, n, 3, 256, 256) stage-II images -> (P, 3n, 3, 256, 256):
    per sample its stage-I image (nearest x4: its own pixels), that upsampled bicubically, stage II."""
    p, n, _, size, _ = high.shape
    flat = low.flatten(0, 1)
    cols = [F.interpolate(flat, size=(size, size), mode="nearest"), upsample(flat, size), high.flatten(0, 1)]
    return torch.stack(cols, 1).reshape(p, 3 * n, *high.shape[2:])


def write_stage_sheets(low: torch.Tensor, high: torch.Tensor, prompts: Prompts, out: Path) -> list[str]:
    """``stages.png`` (``stages-000.png``, ... beyond 16 prompts): a row of columns per prompt."""
    rows = stage_columns(low, high)
    chunks = range(0, len(rows), GRID_ROWS)
    names = []
    for k, lo in enumerate(chunks):
        name = "stages.png" if len(chunks) == 1 else f"stages-{k:03d}.png"
        part = rows[lo : lo + GRID_ROWS]
        captions = [f"{lo + i}: {t}" for i, t in enumerate(prompts.texts[lo : lo + GRID_ROWS])]
        captions[0] = f"{STAGES_LEGEND}\n{captions[0]}"
        save_grid(part.flatten(0, 1), out / name, nrow=part.shape[1], captions=captions)
        names.append(name)
    return names


def write_outputs(images: torch.Tensor, prompts: Prompts, out: Path, info: ExportInfo, seed: int,
                  low: torch.Tensor | None = None) -> dict:
    """PNGs, captioned grid(s) and prompts.json (every file written atomically); with the
    stage-I images ``low`` of a stage-II generator, the stage sheet(s) too."""
    out.mkdir(parents=True, exist_ok=True)
    n_p, n = images.shape[:2]
    arr = to_uint8(images.reshape(-1, *images.shape[2:]))
    files = []
    for p in range(n_p):
        for s in range(n):
            files.append(save_png(arr[p * n + s], out / f"p{p:03d}_s{s:03d}.png").name)
    grids = []
    chunks = range(0, n_p, GRID_ROWS)
    for k, lo in enumerate(chunks):
        name = "grid.png" if len(chunks) == 1 else f"grid-{k:03d}.png"
        rows = images[lo : lo + GRID_ROWS]
        save_grid(rows.reshape(-1, *images.shape[2:]), out / name, nrow=n,
                  captions=[f"{lo + i}: {t}" for i, t in enumerate(prompts.texts[lo : lo + GRID_ROWS])])
        grids.append(name)
    if low is not None:
        grids += write_stage_sheets(low, images, prompts, out)
    record = {"export": info.path, "stage": info.stage, "step": info.step, "text_encoder": info.text_encoder,
              "seed": seed, "n": n, "source": prompts.source, "prompts": prompts.texts, "grids": grids,
              "files": "p<prompt>_s<sample>.png"}
    atomic_json(out / "prompts.json", record)
    return {"out": str(out), "images": len(files), "grids": grids}


def run(
    export: str | Path,
    *,
    prompts: list[str] | None = None,
    prompts_file: str | None = None,
    split: str | None = None,
    shards: str | None = None,
    limit: int = 8,
    caption_index: int = 0,
    n: int = 4,
    seed: int = 0,
    out: str | Path | None = None,
    device: str = "auto",
    encoder: str | None = None,
    text_encoder: TextEncoder | None = None,
    stages: bool = False,
) -> dict:
    """Everything ``main`` does, as a function. ``text_encoder`` reuses a loaded encoder."""
    if n <= 0:
        raise SamplingError(f"--n must be > 0, got {n}")
    if bool(prompts or prompts_file) == bool(split):
        raise SamplingError("give prompts (--prompt / --prompts) or --split, not both and not neither")
    if split and not shards:
        raise SamplingError("--split needs --shards DIR (the shard set the generator was trained on)")
    try:
        device = resolve_device(device)
    except ValueError as e:
        raise SamplingError(str(e)) from e
    texts = read_prompts(prompts, prompts_file) if not split else []
    payload = read_export(export)
    info = export_info(payload, export)
    if stages and info.stage != 2:
        raise SamplingError(f"--stages shows stage II next to the stage-I image it refines: it needs a "
                            f"stage-II export, {export} is stage {info.stage}")
    if split:
        pr = split_prompts(info, shards, split, limit, caption_index, encoder)
    else:
        enc = text_encoder_for(info, encoder)
        if text_encoder is not None:
            if not _same(text_encoder.name, info.text_encoder):
                raise SamplingError(
                    f"given encoder {text_encoder.name!r} is not the export's {info.text_encoder!r}")
            enc = text_encoder
        pr = Prompts(texts, np.asarray(enc.encode(texts), np.float32), "text")
    G = build_from_export(payload).to(device).eval()
    G.requires_grad_(False)
    images = generate_images(G, pr.emb, n, seed, info.z_dim, device, pr.texts)
    # the same seeds give the stage-I images G refined (its forward draws low_res first)
    low = generate_images(G.low_res, pr.emb, n, seed, info.z_dim, device, pr.texts) if stages else None
    return write_outputs(images, pr, Path(out) if out else default_out(export), info, seed, low)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stackgan.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--export", required=True,
                   help="generator export (<run>/export/generator.safetensors; or its folder, or an old .pt)")
    src = p.add_argument_group("what to draw (prompts, or captions from a split)")
    src.add_argument("--prompt", action="append", help="a caption; repeat for several")
    src.add_argument("--prompts", help="text file, one prompt per line")
    src.add_argument("--split", choices=["train", "test"],
                     help="captions (and their embeddings) from the shards")
    src.add_argument("--shards", help="shard folder for --split")
    src.add_argument("--limit", type=int, default=8,
                     help="--split: number of captions, spread over the split")
    src.add_argument("--caption-index", type=int, default=0, help="--split: which of the 10 captions")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default <run folder>/generated)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, the default), cpu, cuda, ...")
    p.add_argument("--encoder", help="text encoder to embed prompts with (must be the export's; default: it)")
    p.add_argument("--stages", action="store_true",
                   help="stage II: also write stages.png (stage I | it upsampled bicubically | stage II)")
    args = p.parse_args(argv)
    try:
        res = run(args.export, prompts=args.prompt, prompts_file=args.prompts, split=args.split,
                  shards=args.shards, limit=args.limit, caption_index=args.caption_index, n=args.n,
                  seed=args.seed, out=args.out, device=args.device, encoder=args.encoder, stages=args.stages)
    except StackGANError as e:
        return report(e, "stackgan.sample")
    print(f"wrote {res['images']} images and {', '.join(res['grids'])} to {res['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
