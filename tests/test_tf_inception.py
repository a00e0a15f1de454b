"""The paper's Inception Score (stackgan.metrics.tf_inception): TF padding reproduced, the
converter's name map and refusals, the weights-only file, the official IS formula; and,
opt-in, logits and IS against TensorFlow itself on a random-weight checkpoint."""
from __future__ import annotations

import importlib.util
import os
import sys
import time

import numpy as np
import pytest
import torch

from stackgan.metrics import core
from stackgan.metrics import tf_inception as T
from stackgan.metrics.stats import ISSums
from tests.conftest import run_cmd

TF_CMD = ("pip install '.[paper-is]' && STACKGAN_TF_TESTS=1 python -m pytest tests/test_tf_inception.py "
          "-k tensorflow")


# ---------------------------------------------------------------- padding, against direct loops
def test_same_pads_known_tf_values():
    """TF's SAME rule (out = ceil(n/s)); the odd pixel goes after: facts from TF's padding docs."""
    assert T.same_pads(4, 3, 2) == (0, 1)
    assert T.same_pads(5, 3, 2) == (1, 1)
    assert T.same_pads(6, 2, 2) == (0, 0)
    assert T.same_pads(7, 3, 1) == (1, 1)
    assert T.same_pads(4, 4, 1) == (1, 2)
    assert T.same_pads(147, 3, 2) == (1, 1) and T.same_pads(148, 3, 2) == (0, 1)


def _before(n, k, s):
    """TF's SAME padding before an axis (tf.nn docs: pad_along = max((out - 1) s + k - n, 0), half before)."""
    return max((-(-n // s) - 1) * s + k - n, 0) // 2


def _windows(n, k, s, padding):
    """Per output index the in-range input indices of its window (TF's definition)."""
    if padding == "VALID":
        return [list(range(i * s, i * s + k)) for i in range((n - k) // s + 1)]
    out, before = -(-n // s), _before(n, k, s)
    return [[j for j in range(i * s - before, i * s - before + k) if 0 <= j < n] for i in range(out)]


def _direct_pool(x, k, s, padding, fn):
    _, _, h, w = x.shape
    rows, cols = _windows(h, k, s, padding), _windows(w, k, s, padding)
    out = np.zeros((x.shape[0], x.shape[1], len(rows), len(cols)))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            out[:, :, i, j] = fn(x[:, :, r][:, :, :, c].reshape(*x.shape[:2], -1), axis=2)
    return out


@pytest.mark.parametrize("size,k,s,padding", [(7, 3, 1, "SAME"), (8, 3, 2, "SAME"), (7, 3, 2, "SAME"),
                                              (6, 2, 2, "SAME"), (9, 3, 2, "VALID"), (5, 5, 3, "SAME")])
def test_pools_match_a_direct_window_computation(size, k, s, padding):
    """Max pools never pick padding; SAME avg pools divide by the real pixels only (TF's count)."""
    x = np.random.default_rng(size * 100 + k * 10 + s).normal(size=(2, 3, size, size + 1)) - 3.0
    t = torch.from_numpy(x)
    for ours, fn in ((T.tf_max_pool, np.max), (T.tf_avg_pool, np.mean)):
        np.testing.assert_allclose(ours(t, k, s, padding).numpy(), _direct_pool(x, k, s, padding, fn),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("kh,kw,stride,padding", [(3, 3, 2, "SAME"), (1, 7, 1, "SAME"), (3, 3, 2, "VALID"),
                                                  (2, 2, 2, "SAME")])
def test_conv_bn_matches_a_direct_computation(kh, kw, stride, padding):
    """conv (TF padding, no bias) + BatchNorm with beta only, eps 0.001 + ReLU, computed by loops."""
    rng = np.random.default_rng(kh * 10 + kw + stride)
    m = T.ConvBN(T.Conv("x", 2, 3, kh, kw, stride, padding)).double()
    w, beta = rng.normal(size=(3, 2, kh, kw)), rng.normal(size=3)
    mean, var = rng.normal(size=3), rng.uniform(0.1, 2, size=3)
    m.load_state_dict({"weight": torch.from_numpy(w), "beta": torch.from_numpy(beta),
                       "moving_mean": torch.from_numpy(mean), "moving_variance": torch.from_numpy(var)})
    x = rng.normal(size=(1, 2, 6, 7))
    rows, cols = _windows(6, kh, stride, padding), _windows(7, kw, stride, padding)
    th, tw = (_before(6, kh, stride), _before(7, kw, stride)) if padding == "SAME" else (0, 0)
    want = np.zeros((1, 3, len(rows), len(cols)))
    for i in range(len(rows)):
        for j in range(len(cols)):
            for a in range(kh):
                for b in range(kw):
                    r, c = i * stride - th + a, j * stride - tw + b
                    if 0 <= r < 6 and 0 <= c < 7:
                        want[0, :, i, j] += w[:, :, a, b] @ x[0, :, r, c]
    c = (slice(None), None, None)
    want = np.maximum((want - mean[c]) / np.sqrt(var[c] + 0.001) + beta[c], 0)
    np.testing.assert_allclose(m(torch.from_numpy(x)).detach().numpy(), want, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- layout, file, converter
def test_layout_is_inception_v3_with_the_official_scopes():
    """94 convs (Inception-v3 without its aux head), 4 variables each + the FC; names as in the
    official inception_model.py (old TF-slim): conv0..conv4, unnamed convs Conv, Conv_1, ..."""
    shapes = T.tf_shapes(51)
    assert len(T.convs()) == 94 and len(shapes) == 94 * 4 + 2
    assert shapes["conv0/weights"] == (3, 3, 3, 32)
    assert shapes["mixed_35x35x256a/branch_pool/Conv/weights"] == (1, 1, 192, 32)
    assert shapes["mixed_17x17x768b/branch7x7dbl/Conv_4/weights"] == (1, 7, 128, 192)
    assert shapes["mixed_8x8x2048b/branch3x3dbl/Conv_3/weights"] == (3, 1, 384, 384)
    assert shapes["mixed_17x17x1280a/branch7x7x3/Conv_3/BatchNorm/moving_variance"] == (192,)
    assert shapes["logits/logits/weights"] == (2048, 51)
    net = T.TFInceptionV3(51)
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 299, 299)).shape == (1, 51)


def _calibrate(net: T.TFInceptionV3, x: torch.Tensor) -> None:
    """Every BatchNorm's moving mean/variance := its conv's statistics on ``x`` (as training
    leaves them), so that a random-weight net's logits depend on the image (random statistics
    wash the image out)."""
    def pre(m, args):
        c = m.spec
        y = torch.nn.functional.conv2d(T.tf_pad(args[0], c.kh, c.kw, c.stride, c.padding), m.weight,
                                       stride=c.stride)
        m.moving_mean.copy_(y.mean((0, 2, 3)))
        m.moving_variance.copy_(y.var((0, 2, 3)))

    hooks = [m.register_forward_pre_hook(pre) for m in net.convs.values()]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()


def _random_net(x: torch.Tensor, seed: int) -> T.TFInceptionV3:
    """He-initialised convs, small betas, statistics of ``x``, a head of a trained net's scale."""
    g = torch.Generator().manual_seed(seed)
    net = T.TFInceptionV3(51)
    with torch.no_grad():
        for m in net.convs.values():
            m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5, generator=g)
            m.beta.normal_(0, 0.2, generator=g)
        net.logits.weight.normal_(0, 10 * (2 / 2048) ** 0.5, generator=g)
        net.logits.bias.normal_(0, 0.2, generator=g)
    _calibrate(net, x)
    return net.eval()


def _random_sd(seed=0, classes=51):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in T.TFInceptionV3(classes).state_dict().items()}


def test_state_dict_round_trips_through_the_weights_only_loader(tmp_path):
    sd = _random_sd(1, classes=21)  # the flowers model has 20 + 1 classes: read from the file
    path = tmp_path / "inception51.pt"
    torch.save(sd, path)
    assert set(torch.load(path, weights_only=True)) == set(sd)
    net = T.load_paper_inception(path)
    assert net.logits.out_features == 21
    for k, v in net.state_dict().items():
        assert torch.equal(v, sd[k]), k
    bad = dict(sd)
    bad["convs.conv0.weight"] = torch.zeros(32, 3, 5, 5)
    torch.save(bad, path)
    with pytest.raises(T.TFInceptionError, match=r"convs\.conv0\.weight has shape"):
        T.load_paper_inception(path)
    del bad["convs.conv0.weight"]
    torch.save(bad, path)
    with pytest.raises(T.TFInceptionError, match="convs.conv0.weight"):
        T.load_paper_inception(path)
    with pytest.raises(T.TFInceptionError, match="tf_inception convert"):
        T.load_paper_inception(tmp_path / "absent.pt")


def _tf_vars(seed=0, ema=True):
    """A fake checkpoint: every variable, EMA shadows with other values, and what training leaves."""
    rng = np.random.default_rng(seed)
    v = {n: rng.normal(size=s).astype(np.float32) for n, s in T.tf_shapes(51).items()}
    if ema:
        v.update({n + T.EMA: rng.normal(size=a.shape).astype(np.float32) for n, a in list(v.items())})
    v["global_step"] = np.array(5000)
    v["conv0/weights/RMSProp"] = rng.normal(size=(3, 3, 3, 32)).astype(np.float32)
    v["aux_logits/FC/weights"] = rng.normal(size=(768, 51)).astype(np.float32)
    v["tower_0/total_loss/avg"] = np.array(1.0)
    return v


def _convert(v):
    return T.state_dict_from_tf({n: list(a.shape) for n, a in v.items()}, v.__getitem__, "fake.ckpt")


def test_converter_maps_names_and_layouts_and_prefers_moving_averages():
    v = _tf_vars()
    sd, report = _convert(v)
    assert report == {"variables": 378, "from_ema": 378, "classes": 51, "ignored": 4}
    assert set(sd) == set(T.TFInceptionV3(51).state_dict())
    w = v["mixed_17x17x768b/branch7x7/Conv_1/weights" + T.EMA]  # HWIO (1, 7, 128, 128)
    got = sd["convs.mixed_17x17x768b__branch7x7__Conv_1.weight"]  # OIHW
    assert got.shape == (128, 128, 1, 7) and got[5, 9, 0, 3] == torch.tensor(w[0, 3, 9, 5])
    assert torch.equal(sd["logits.weight"], torch.from_numpy(v["logits/logits/weights" + T.EMA]).t())
    assert torch.equal(sd["convs.conv4.moving_variance"],
                       torch.from_numpy(v["conv4/BatchNorm/moving_variance" + T.EMA]))
    sd_raw, report = _convert(_tf_vars(ema=False))  # a checkpoint without averages: the raw values
    assert report["from_ema"] == 0
    raw = _tf_vars(ema=False)["conv0/BatchNorm/beta"]
    assert torch.equal(sd_raw["convs.conv0.beta"], torch.from_numpy(raw))


def test_converter_refuses_missing_unknown_and_misshapen_variables_by_name():
    v = _tf_vars()
    del v["mixed_35x35x288a/branch5x5/Conv_1/BatchNorm/moving_mean"]
    with pytest.raises(T.TFInceptionError, match=r"fake\.ckpt: 1 variables missing.*5x5/Conv_1/BatchNorm"):
        _convert(v)
    v = _tf_vars()
    v["mixed_35x35x256a/branch1x1/Conv_9/weights"] = np.zeros((1, 1, 192, 64), np.float32)
    with pytest.raises(T.TFInceptionError, match="does not have.*branch1x1/Conv_9/weights"):
        _convert(v)
    v = _tf_vars()
    v["conv2/weights" + T.EMA] = np.zeros((3, 3, 32, 65), np.float32)
    with pytest.raises(T.TFInceptionError, match=r"conv2/weights/ExponentialMovingAverage has shape "
                                                 r"\(3, 3, 32, 65\)"):
        _convert(v)
    with pytest.raises(T.TFInceptionError, match="no logits/logits/biases"):
        T.state_dict_from_tf({"InceptionV3/Logits/weights": [2048, 1001]}, None, "contrib.ckpt")


def test_converter_without_tensorflow_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow -> ImportError
    with pytest.raises(T.TFInceptionError, match=r"paper-is"):
        T.convert(tmp_path / "model.ckpt-5000", tmp_path / "out.pt")
    from stackgan import errors

    out = str(tmp_path / "o.pt")
    assert T.main(["convert", "--ckpt", str(tmp_path / "m"), "--out", out]) == errors.EXIT_BAD_INPUT


def test_convert_command_reports_a_bad_checkpoint_in_one_line(tmp_path):
    """Without TensorFlow: the extra to install; with it: the checkpoint it cannot read."""
    from stackgan import errors

    p = run_cmd([sys.executable, "-m", "stackgan.metrics.tf_inception", "convert", "--ckpt",
                 "no/such/model.ckpt-5000", "--out", str(tmp_path / "o.pt")],
                cwd=tmp_path, env={"TF_CPP_MIN_LOG_LEVEL": "3"})
    assert p.returncode == errors.EXIT_BAD_INPUT, p.stderr
    assert "Traceback" not in p.stderr and "error: " in p.stderr
    has_tf = importlib.util.find_spec("tensorflow") is not None
    assert ("no/such/model.ckpt-5000" if has_tf else "paper-is") in p.stderr


# ---------------------------------------------------------------- the score
def test_paper_is_of_constructed_probabilities():
    assert T.paper_inception_score(np.full((100, 50), 1 / 50)) == pytest.approx((1.0, 0.0), abs=1e-12)
    for k in (1, 2, 5, 50):
        p = np.eye(50)[np.arange(20 * k) % k]  # one-hot, spread evenly over k classes in every split
        assert T.paper_inception_score(p, splits=10) == pytest.approx((k, 0.0), abs=1e-9)
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.full(50, 0.3), size=103)
    direct = []
    for i in range(10):  # exp(H(marginal) - mean H(p(y|x))), a rearrangement of the KL form
        part = p[i * 103 // 10:(i + 1) * 103 // 10]
        m = part.mean(0)
        direct.append(np.exp(-(m * np.log(m)).sum() + (part * np.log(part)).sum(1).mean()))
    assert T.paper_inception_score(p) == pytest.approx((np.mean(direct), np.std(direct)), rel=1e-12)
    with pytest.raises(ValueError, match="N >= splits"):
        T.paper_inception_score(p[:5])


def test_background_logit_is_dropped_and_the_metric_sums_agree():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(60, 51)) * 3
    probs = T.paper_probs(logits)
    assert probs.shape == (60, 50)
    logits[:, 0] += 50  # a dominant background logit changes nothing
    np.testing.assert_allclose(T.paper_probs(logits), probs, rtol=1e-12)
    sums = ISSums(10, 50)  # what inception_score_paper accumulates, batch by batch
    for lo in range(0, 60, 16):
        lg = torch.from_numpy(logits[lo:lo + 16])
        sums.add(lg[:, 1:], torch.arange(lo, lo + len(lg)) * 10 // 60)
    assert sums.score() == pytest.approx(T.paper_inception_score(probs), rel=1e-10)


def test_preprocess_is_the_official_input():
    img = torch.full((2, 3, 64, 64), 0.5)  # uint8 191 -> 191 / 127.5 - 1
    x = T.paper_preprocess(img)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, 191 / 127.5 - 1))


def test_metric_is_registered_and_asks_for_the_converted_file(tmp_path):
    assert core.get("inception_score_paper") is T.inception_score_paper_metric
    ctx = core.EvalContext(shards=str(tmp_path), image_size=256, z_dim=100, text_encoder="x", text_dim=1024)
    with pytest.raises(core.MetricError, match="--paper-inception"):
        T.check_paper_inception(ctx)
    ctx.paper_inception = str(tmp_path / "absent.pt")
    with pytest.raises(core.MetricError, match="absent.pt"):
        T.check_paper_inception(ctx)


def test_inception_score_paper_through_the_registry(tmp_path_factory, tmp_path):
    """The registered metric end to end: test captions, the converted net, 20 samples in 2 splits,
    equal to the score of the same images computed here step by step."""
    from tests.test_judge import DIM, ENCODER, eval_shards
    from tests.test_metrics import Z_DIM, OracleG

    ctx = core.EvalContext(shards=str(eval_shards(tmp_path_factory)), image_size=64, z_dim=Z_DIM,
                           text_encoder=ENCODER, text_dim=DIM, num_samples=20, is_splits=2, batch_size=10,
                           paper_inception=str(tmp_path / "inception51.pt"), log=lambda m: None)
    from stackgan.metrics.inception import TAG
    from stackgan.metrics.scores import split_data

    data = split_data(ctx, "test")
    perm = np.random.default_rng([ctx.seed, TAG]).permutation(len(data))
    i = np.arange(20)
    emb = data.emb[perm[i % len(data)], (i // len(data)) % data.emb.shape[1]]
    x = T.paper_preprocess(torch.cat([img for _, _, img in core.generate(OracleG(), ctx, emb, TAG)]))
    net = _random_net(x, seed=2)
    torch.save(net.state_dict(), tmp_path / "inception51.pt")
    with torch.no_grad():
        want = T.paper_inception_score(T.paper_probs(net(x)), 2)
    assert want[0] > 1.01, "the check is weak when the random net gives one distribution for all"

    res = core.compute("inception_score_paper", OracleG(), ctx)["inception_score_paper"]
    assert res["n"] == 20 and res["splits"] == 2 and "paper" in res["note"]
    assert (res["mean"], res["std"]) == pytest.approx(want, abs=1e-5)  # batches of 10 vs 20: rounding


# ---------------------------------------------------------------- against TensorFlow (opt-in)
_TF = importlib.util.find_spec("tensorflow") is not None and os.environ.get("STACKGAN_TF_TESTS") == "1"


def _tf_forward(tf, values: dict, x_nhwc: np.ndarray):
    """The official graph in TF ops (tf.nn conv/pools with TF's own padding, batch_normalization)."""
    def conv(c, x):
        w = values[f"{c.scope}/weights"]
        x = tf.nn.conv2d(x, w, strides=c.stride, padding=c.padding)
        bn = [values[f"{c.scope}/BatchNorm/{k}"] for k in ("moving_mean", "moving_variance", "beta")]
        return tf.nn.relu(tf.nn.batch_normalization(x, bn[0], bn[1], bn[2], None, 0.001))

    def run(ops, x):
        for op in ops:
            if isinstance(op, T.Conv):
                x = conv(op, x)
            elif op[0] == "fork":
                x = tf.concat([conv(c, x) for c in op[1]], axis=3)
            else:
                pool = tf.nn.max_pool2d if op[0] == "max" else tf.nn.avg_pool2d
                x = pool(x, op[1], op[2], op[3])
        return x

    stem, blocks = T.layout()
    x = run(stem, tf.constant(x_nhwc))
    for _, branches in blocks:
        x = tf.concat([run(ops, x) for ops in branches], axis=3)
    x = tf.reshape(tf.nn.avg_pool2d(x, x.shape[1:3], 1, "VALID"), [x.shape[0], 2048])
    return tf.matmul(x, values["logits/logits/weights"]) + values["logits/logits/biases"]


def _tf_inception_score(tf, logits, splits):
    """The official score with TF ops: softmax of logits[:, 1:], per split exp(E sum p log(p / mean p))."""
    p = tf.nn.softmax(logits[:, 1:])
    n, scores = int(p.shape[0]), []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        kl = part * (tf.math.log(part) - tf.math.log(tf.reduce_mean(part, 0, keepdims=True)))
        scores.append(tf.exp(tf.reduce_mean(tf.reduce_sum(kl, 1))))
    return float(tf.reduce_mean(tf.stack(scores)))


def _standing_statistics(values: dict, x_nhwc: np.ndarray) -> None:
    """Set every TF moving mean/variance in ``values`` to its conv's statistics on ``x``."""
    net = T.TFInceptionV3(51)
    net.load_state_dict(T.state_dict_from_tf({n: v.shape for n, v in values.items()}, values.__getitem__)[0])
    _calibrate(net, torch.from_numpy(x_nhwc).permute(0, 3, 1, 2))
    for m in net.convs.values():
        values[f"{m.spec.scope}/BatchNorm/moving_mean"] = m.moving_mean.numpy().copy()
        values[f"{m.spec.scope}/BatchNorm/moving_variance"] = m.moving_variance.numpy().copy()


@pytest.mark.slow
@pytest.mark.skipif(not _TF, reason=f"opt-in, needs tensorflow-cpu: {TF_CMD}")
def test_tensorflow_checkpoint_converts_to_the_same_logits_and_score(tmp_path):
    """A random-weight checkpoint in the official layout (moving averages differing from the raw
    values, plus global_step, an RMSProp slot, the aux head) written by TF's Saver; TF's own
    forward on the averaged values (what the official score restores) vs ours after convert."""
    import tensorflow as tf

    t0 = time.time()
    N = 60  # 6 images per split
    rng = np.random.default_rng(0)
    shapes, raw, ema = T.tf_shapes(51), {}, {}
    for n, s in shapes.items():
        for d in (raw, ema):
            if n.endswith("/weights"):
                d[n] = rng.normal(0, np.sqrt(2.0 / np.prod(s[:-1])), size=s)
            elif n.endswith("moving_variance"):
                d[n] = rng.uniform(0.5, 2.0, size=s)
            else:
                d[n] = rng.normal(0, 0.2, size=s)
    ema = {n: v.astype(np.float32) for n, v in ema.items()}
    # images that differ in layout and colour (i.i.d. noise images all look alike after the pool)
    blocks = np.kron(rng.uniform(-0.9, 0.9, size=(N, 4, 4, 3)), np.ones((1, 75, 75, 1)))[:, :299, :299]
    x = np.clip(blocks + rng.normal(0, 0.1, size=blocks.shape), -1, 1).astype(np.float32)
    _standing_statistics(ema, x)
    ema["logits/logits/weights"] *= 10  # a trained head's scale (|logits| ~ 30): an IS well above 1
    extra = {"global_step": np.array(5000, np.int64), "conv0/weights/RMSProp": raw["conv0/weights"],
             "aux_logits/FC/weights": rng.normal(size=(768, 51)), "aux_logits/FC/biases": np.zeros(51)}
    values = {**raw, **{n + T.EMA: v for n, v in ema.items()}, **extra}
    ckpt = tmp_path / "model.ckpt"
    with tf.Graph().as_default():
        var = {n: tf.compat.v1.Variable(np.asarray(v, np.float32 if v.dtype.kind == "f" else v.dtype),
                                        name=f"v{i}") for i, (n, v) in enumerate(values.items())}
        saver = tf.compat.v1.train.Saver(var_list=var)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            prefix = saver.save(sess, str(ckpt), global_step=5000)
    assert T.main(["convert", "--ckpt", prefix, "--out", str(tmp_path / "inception51.pt")]) == 0
    net = T.load_paper_inception(tmp_path / "inception51.pt")

    t1 = time.time()
    want = np.concatenate([_tf_forward(tf, ema, x[i:i + 20]).numpy() for i in range(0, N, 20)])
    t2 = time.time()
    with torch.no_grad():
        got = torch.cat([net(torch.from_numpy(x[i:i + 10]).permute(0, 3, 1, 2))
                         for i in range(0, N, 10)]).numpy()
    t3 = time.time()
    # the same in float64 on both sides: what is left is the conversion and the semantics, not rounding
    ema64 = {n: v.astype(np.float64) for n, v in ema.items()}
    want64 = _tf_forward(tf, ema64, x[:10].astype(np.float64)).numpy()
    with torch.no_grad():
        got64 = net.double()(torch.from_numpy(x[:10]).double().permute(0, 3, 1, 2)).numpy()
    err32, err64 = np.abs(got - want).max(), np.abs(got64 - want64).max()
    scale = np.abs(want).max()
    tf_is = _tf_inception_score(tf, tf.constant(want), 10)
    ours = T.paper_inception_score(T.paper_probs(got), 10)[0]
    print(f"\nlogits float32: max |ours - TF| = {err32:.2e} (max |logit| {scale:.2f}, std over images "
          f"{want.std(0).mean():.3f}); float64: {err64:.2e}; IS TF {tf_is:.6f} ours {ours:.6f} "
          f"(|diff| {abs(tf_is - ours):.1e}); checkpoint+convert {t1 - t0:.1f}s, TF forward {t2 - t1:.1f}s, "
          f"torch forward {t3 - t2:.1f}s ({N} images)")
    assert want.std(0).mean() > 0.5, "logits hardly depend on the image: the comparison would be weak"
    assert err64 <= 1e-4
    assert err32 <= 1e-4 * max(1.0, scale)  # float32: both sides round, relative to the logits' size
    assert tf_is > 1.2 and abs(ours - tf_is) <= 1e-3
