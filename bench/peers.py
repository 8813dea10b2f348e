"""Autoregressive peers for bench/decode_speed.py, at our AT's dimensions with random weights:
Hugging Face MarianMT (eager PyTorch) and the same MarianMT model converted to CTranslate2, an
optimized C++ inference engine (fp32 and int8, beam 4 and greedy).

Every peer decodes exactly `tgt_len` tokens and then EOS, as our rows do. Each builder returns
(peer, None), or (None, reason) when its package is missing (`pip install -e .[bench]`).
"""
from __future__ import annotations

import atexit
import shutil
import tempfile

import torch

CT2_ROWS = {"CT2 fp32 beam-4": ("float32", 4), "CT2 fp32 greedy": ("float32", 1),
            "CT2 int8 beam-4": ("int8", 4), "CT2 int8 greedy": ("int8", 1)}


def marian_model(cfg, a, dtype=torch.float32):
    """A randomly initialized MarianMTModel with our AT's dimensions and special ids (seeded)."""
    from transformers import MarianConfig, MarianMTModel

    mcfg = MarianConfig(vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.vocab_size, d_model=cfg.d_model,
                        encoder_layers=cfg.enc_layers, decoder_layers=cfg.dec_layers,
                        encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
                        encoder_ffn_dim=cfg.d_ffn, decoder_ffn_dim=cfg.d_ffn,
                        max_position_embeddings=max(1024, a.src_len + a.tgt_len + 8), **marian_ids(cfg))
    torch.manual_seed(a.seed)
    return MarianMTModel(mcfg).to(dtype).eval()


def marian_ids(cfg) -> dict:
    return dict(pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id, decoder_start_token_id=cfg.bos_id,
                forced_eos_token_id=cfg.eos_id)


def build_marian(cfg, a, dtype):
    """(fn(src) -> mean output length, None) running MarianMT beam-4 generate, or (None, reason)."""
    try:
        from transformers import GenerationConfig
    except ImportError as e:
        return None, f"transformers not installed ({e}); `pip install -e .[bench]` to add the peer"
    model = marian_model(cfg, a).to(a.device, dtype)
    # tgt_len tokens then a forced EOS: the same tgt_len + 1 decoder steps as our beam search.
    gen = GenerationConfig(num_beams=4, do_sample=False, early_stopping=False, use_cache=True,
                           min_new_tokens=a.tgt_len, max_new_tokens=a.tgt_len + 1, length_penalty=1.0,
                           **marian_ids(cfg))

    @torch.no_grad()
    def run(src):
        seqs = model.generate(input_ids=src, attention_mask=src.ne(cfg.pad_id), generation_config=gen)
        return float(seqs.size(1) - 2)  # minus decoder start and the final EOS
    return run, None


class _IdTokenizer:
    """What CTranslate2's converter reads from a tokenizer: the vocabulary, token i being our id i.
    The converter drops Marian's last vocabulary entry (Transformers' added "<pad>", which the
    decoder's zero start embedding replaces), so the CTranslate2 model has vocab_size - 1 tokens:
    the last id is named "<pad>" and inputs holding it use the one before (ct2_tokens)."""

    def __init__(self, cfg):
        special = {cfg.pad_id: "<blank>", cfg.unk_id: "<unk>", cfg.bos_id: "<s>", cfg.eos_id: "</s>",
                   cfg.vocab_size - 1: "<pad>"}
        self.tokens = [special.get(i, f"t{i}") for i in range(cfg.vocab_size)]
        self.eos_token, self.unk_token = special[cfg.eos_id], special[cfg.unk_id]

    def get_vocab(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}


def convert_to_ct2(cfg, a, out_dir: str) -> list[str]:
    """Save marian_model() and convert it with CTranslate2's TransformersConverter (fp32 weights;
    int8 is chosen when loading). Returns the vocabulary, token i being our id i."""
    from ctranslate2.converters import TransformersConverter

    tok = _IdTokenizer(cfg)

    class Converter(TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return tok   # ids only: no sentencepiece files to download or build

    hf_dir = tempfile.mkdtemp(prefix="marian-hf-")
    try:
        marian_model(cfg, a).save_pretrained(hf_dir)
        Converter(hf_dir).convert(out_dir, force=True)
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
    return tok.tokens


def ct2_row(name: str, threads: int | None) -> str:
    return name if threads is None else f"{name} ({threads} thr)"


def build_ct2(cfg, a):
    """({row name: fn(src) -> mean output length}, None) for CT2_ROWS on a.device, or (None,
    reason). On a CPU each row runs with 1 and with a.threads intra-op threads (CTranslate2's own
    pool): on a 2-vCPU VM its beam search at batch 1 ran 5-31x slower on 2 threads than on 1
    (BENCHMARKS.md), so the peer is shown at each and compared at its best.
    CTranslate2 runs in a child process of its own, which converts the model and decodes what
    this process sends it: loaded in this process (it bundles its own libgomp), it slowed our
    PyTorch rows up to 2.3x."""
    import importlib.util

    for package in ("ctranslate2", "transformers"):   # the converter reads the model with transformers
        if importlib.util.find_spec(package) is None:
            return None, f"{package} not installed; `pip install -e .[bench]` to add the CTranslate2 rows"
    import multiprocessing

    threads = [None] if a.device != "cpu" else sorted({1, a.threads or torch.get_num_threads()})
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_ct2_child, args=(there, cfg, a, threads), daemon=True)
    child.start()
    try:
        status, names = here.recv()
    except EOFError:   # it died before it could say why
        child.join()
        status, names = "error", f"its process exited with code {child.exitcode}"
    if status != "ok":
        child.join()
        return None, f"CTranslate2 failed: {names}"

    def decoder(name):
        def run(src):
            here.send((name, src.tolist()))
            return here.recv()
        return run

    atexit.register(lambda: (here.send(None), child.join(timeout=30)))
    return {name: decoder(name) for name in names}, None


def _ct2_child(conn, cfg, a, threads: list[int | None]) -> None:
    """The CTranslate2 process: build every row, then decode (row name, token ids) until None."""
    model_dir = tempfile.mkdtemp(prefix="ct2-marian-")
    try:
        import ctranslate2
        import transformers

        transformers.utils.logging.disable_progress_bar()   # saving the model
        tokens = convert_to_ct2(cfg, a, model_dir)
        rows = {}
        for name, (compute_type, beam) in CT2_ROWS.items():
            for t in threads:
                translator = ctranslate2.Translator(model_dir, device=a.device, compute_type=compute_type,
                                                    intra_threads=t or 0)
                rows[ct2_row(name, t)] = _ct2_decoder(translator, tokens, beam, a.tgt_len, cfg.pad_id)
    except Exception as e:  # reported to the parent, which skips the peer
        shutil.rmtree(model_dir, ignore_errors=True)
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", list(rows)))
    try:
        while (msg := conn.recv()) is not None:
            name, src = msg
            conn.send(rows[name](src))
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)


def _ct2_decoder(translator, tokens: list[str], beam: int, tgt_len: int, pad_id: int):
    # Our beam search and MarianMT's generate take tgt_len + 1 decoder steps: tgt_len tokens, then
    # EOS. CTranslate2 has no forced EOS; stopped at max_decoding_length it emits no EOS, so it is
    # held to exactly tgt_len + 1 steps whose last token stands for the EOS (not counted below).
    def run(src: list[list[int]]):
        last = len(tokens) - 2   # the CTranslate2 vocabulary's last id (see _IdTokenizer)
        batch = [[tokens[min(i, last)] for i in row if i != pad_id] for row in src]   # EOS kept
        out = translator.translate_batch(batch, beam_size=beam, max_batch_size=len(batch), length_penalty=1.0,
                                         min_decoding_length=tgt_len + 1, max_decoding_length=tgt_len + 1)
        return sum(len(r.hypotheses[0]) - 1 for r in out) / len(out)
    return run
