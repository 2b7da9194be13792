"""The Hugging Face peer: `SwitchTransformersForConditionalGeneration` generating with random bf16 weights.

Two placements, the baselines of the Pre-gated MoE paper:
- "gpu-only": the whole model on the execution device.
- "on-demand": non-expert weights on the execution device; every expert's weights live once in host memory
  (one flat buffer, page-locked with cudaHostRegister on CUDA) and are copied to the device when that expert
  is called, by an accelerate `AlignDevicesHook(offload=True)` on each `expert_k` module (the paper's
  MoE-OnDemand: fetch on the critical path, nothing cached, nothing prefetched). The module's own parameters
  stay on the meta device; accelerate materializes them from the host buffer in `pre_forward` and sends them
  back to meta in `post_forward`.

Weights are random (never zeros), drawn with HF's init scales, built on the meta device and filled per
parameter from one seeded generator on the execution device, so both modes get bit-identical weights and
generate identical tokens. Timing: `generate(max_new_tokens=N, min_new_tokens=N)` so every run emits exactly N
tokens; prefill is timed as `generate(max_new_tokens=1)` (encoder over the input + the first decoder step).

    python -m pregated_jax.bench.hf_peer --preset switch-base-8 --mode on-demand --batch 1 --beams 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

import torch

MODES = ("gpu-only", "on-demand")
PREFILL_METHOD = ("median wall time of generate(max_new_tokens=1, min_new_tokens=1): encoder over the input "
                  "plus the first decoder step, synchronized")


class HFPeer:
    """A built model plus the host buffer holding its experts (on-demand); `close()` releases both."""

    def __init__(self, hf_config: dict[str, Any], mode: str, device: str = "cuda", seed: int = 0,
                 pin_host: bool = True):
        from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.device = mode, torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        hf_config = {k: v for k, v in hf_config.items() if k != "pregated_jax"}
        self.config = SwitchTransformersConfig(**hf_config, attn_implementation="eager")
        with torch.device("meta"):
            model = SwitchTransformersForConditionalGeneration(self.config)
        model.eval().requires_grad_(False)
        self.model = model
        self.host_buffer: torch.Tensor | None = None  # flat bf16, all experts (on-demand only)
        self.host_pinned = False
        self._registered_ptr: int | None = None
        self.expert_weights: dict[str, dict[str, torch.Tensor]] = {}  # expert module name -> host views
        self._materialize(seed, pin_host)
        if mode == "on-demand":
            self._attach_expert_hooks()
        self._check_placement()

    # --- weights ---------------------------------------------------------------------------------
    def _std(self, module: torch.nn.Module, mod_name: str, pname: str) -> float | None:
        """HF's `_init_weights` scale for a parameter (initializer_factor 1); None means ones."""
        c = self.config
        cls = type(module).__name__
        if cls == "SwitchTransformersLayerNorm":
            return None
        if mod_name.endswith("router.classifier") or mod_name in ("shared", "lm_head"):
            return 1.0
        if ".experts.expert_" in mod_name:
            return c.d_model ** -0.5  # HF uses d_model for both expert matrices
        last = mod_name.rsplit(".", 1)[-1]
        if ".mlp." in f"{mod_name}." and last in ("wi", "wo"):  # dense FFN
            return c.d_model ** -0.5 if last == "wi" else c.d_ff ** -0.5
        if last == "relative_attention_bias":
            return c.d_model ** -0.5
        if last == "q":
            return (c.d_model * c.d_kv) ** -0.5
        if last in ("k", "v"):
            return c.d_model ** -0.5
        if last == "o":
            return (c.num_heads * c.d_kv) ** -0.5
        raise ValueError(f"no init rule for parameter {mod_name}.{pname} ({cls})")

    def _materialize(self, seed: int, pin_host: bool) -> None:
        """Replaces every meta parameter by random bf16 values: on the device, or (on-demand experts) in the
        host buffer. One generator on the execution device, same order in both modes -> identical weights."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        entries = []  # (module, mod_name, pname, param), tied parameters once
        seen: dict[int, torch.nn.Parameter] = {}
        for mod_name, module in self.model.named_modules():
            for pname, p in list(module._parameters.items()):
                if p is None:
                    continue
                entries.append((module, mod_name, pname, p))
        offload = self.mode == "on-demand"
        is_expert = lambda mod_name: ".experts.expert_" in mod_name  # noqa: E731
        if offload:
            total = sum(p.numel() for _, n, _, p in entries if is_expert(n))
            self.host_buffer = torch.empty(total, dtype=torch.bfloat16, device="cpu")
            if self.on_cuda and pin_host:
                self._pin(self.host_buffer)
        offset = 0
        for module, mod_name, pname, p in entries:
            if id(p) in seen:  # tied weight: share the already materialized parameter
                module._parameters[pname] = seen[id(p)]
                continue
            std = self._std(module, mod_name, pname)
            if std is None:
                value = torch.ones(p.shape, dtype=torch.bfloat16, device=self.device)
            else:
                value = torch.randn(p.shape, generator=gen, dtype=torch.bfloat16, device=self.device).mul_(std)
            if offload and is_expert(mod_name):
                view = self.host_buffer[offset:offset + p.numel()].view(p.shape)
                offset += p.numel()
                view.copy_(value)
                del value
                self.expert_weights.setdefault(mod_name.rsplit(".", 1)[0], {})[
                    f"{mod_name.rsplit('.', 1)[1]}.{pname}"] = view
                # Stays on meta, but as bf16: accelerate casts the fetched value to the meta parameter's dtype.
                new = torch.nn.Parameter(torch.empty(p.shape, dtype=torch.bfloat16, device="meta"),
                                         requires_grad=False)
            else:
                new = torch.nn.Parameter(value, requires_grad=False)
            module._parameters[pname] = new
            seen[id(p)] = new
        if offload:
            assert offset == self.host_buffer.numel()
        if self.on_cuda:
            torch.cuda.synchronize(self.device)

    def _pin(self, buf: torch.Tensor) -> None:
        """Page-locks the buffer in place (no power-of-two rounding as with torch's pinned allocator)."""
        nbytes = buf.numel() * buf.element_size()
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
        if int(err) != 0:
            print(f"hf_peer: cudaHostRegister of {nbytes / 2**30:.2f} GiB failed ({err}); experts stay pageable",
                  file=sys.stderr)
            return
        self._registered_ptr = buf.data_ptr()
        self.host_pinned = bool(buf.is_pinned())

    def _attach_expert_hooks(self) -> None:
        from accelerate.hooks import attach_align_device_hook

        for name, weights in self.expert_weights.items():
            expert = self.model.get_submodule(name)
            # preload_module_classes: one hook on the expert module fetches wi and wo together when it is called.
            attach_align_device_hook(expert, execution_device=self.device, offload=True, weights_map=weights,
                                     preload_module_classes=[type(expert).__name__])

    def _check_placement(self) -> None:
        for name, p in self.model.named_parameters():
            want = "meta" if self.mode == "on-demand" and ".experts.expert_" in name else self.device.type
            if p.device.type != want:
                raise AssertionError(f"{name} is on {p.device}, expected {want}")
        if self.host_buffer is not None:
            assert self.host_buffer.device.type == "cpu"

    # --- facts -----------------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        n = sum(p.numel() for p in self.model.parameters())  # named_parameters de-duplicates ties
        return n

    @property
    def device_param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if p.device.type != "meta")

    @property
    def host_expert_bytes(self) -> int:
        return 0 if self.host_buffer is None else self.host_buffer.numel() * self.host_buffer.element_size()

    def close(self) -> None:
        from accelerate.hooks import remove_hook_from_submodules

        if self.mode == "on-demand":
            remove_hook_from_submodules(self.model)
        self.model = None
        if self._registered_ptr is not None:
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaHostUnregister(self._registered_ptr)
            self._registered_ptr = None
        self.host_buffer = None
        self.expert_weights = {}
        if self.on_cuda:
            torch.cuda.empty_cache()


def _versions() -> dict[str, str]:
    import transformers

    try:
        import accelerate
        acc = accelerate.__version__
    except ImportError:
        acc = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": acc,
            "python": platform.python_version()}


def run_hf_peer(preset_hf_config: dict[str, Any], mode: str, batch: int, num_beams: int, input_len: int = 256,
                new_tokens: int = 64, device: str = "cuda", seed: int = 0, repeats: int = 3,
                pin_host: bool = True, preset: str | None = None) -> dict[str, Any]:
    """Builds the peer, warms it up, times prefill and full generation; returns a JSON-able result dict."""
    if new_tokens < 1 or repeats < 1:
        raise ValueError("new_tokens and repeats must be >= 1")
    dev = torch.device(device)
    on_cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if on_cuda else (lambda: None)
    t0 = time.perf_counter()
    peer = HFPeer(preset_hf_config, mode, device=device, seed=seed, pin_host=pin_host)
    build_s = time.perf_counter() - t0
    try:
        cfg = peer.config
        gen = torch.Generator().manual_seed(seed)
        high = min(32000, cfg.vocab_size)
        input_ids = torch.randint(2, high, (batch, input_len), generator=gen).to(dev)
        attention_mask = torch.ones_like(input_ids)
        model_device_bytes = torch.cuda.memory_allocated(dev) if on_cuda else None

        def generate(n: int) -> torch.Tensor:
            with torch.inference_mode():
                return peer.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, num_beams=num_beams, num_return_sequences=1, use_cache=True,
                    pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id,
                    decoder_start_token_id=cfg.decoder_start_token_id)

        def timed(n: int) -> tuple[float, torch.Tensor]:
            sync()
            start = time.perf_counter()
            out = generate(n)
            sync()
            return time.perf_counter() - start, out

        generate(min(2, new_tokens))  # warm-up
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        prefill_all = [timed(1)[0] for _ in range(repeats)]
        e2e_all, out = [], None
        for _ in range(repeats):
            s, out = timed(new_tokens)
            e2e_all.append(s)
        tokens = out[:, 1:].tolist()  # drop the decoder start token
        if any(len(t) != new_tokens for t in tokens):
            raise AssertionError(f"generate returned {[len(t) for t in tokens]} tokens, expected {new_tokens}")
        e2e, prefill = statistics.median(e2e_all), statistics.median(prefill_all)
        peak = torch.cuda.max_memory_allocated(dev) if on_cuda else None
        decode_s = e2e - prefill
        return {
            "preset": preset, "mode": mode, "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if on_cuda else platform.processor() or "cpu",
            "batch": batch, "num_beams": num_beams, "input_len": input_len, "new_tokens": new_tokens,
            "seed": seed, "repeats": repeats, "dtype": "bfloat16", "attn_implementation": "eager",
            "e2e_s": e2e, "e2e_s_all": e2e_all, "tokens_per_s": batch * new_tokens / e2e,
            "prefill_s": prefill, "prefill_s_all": prefill_all, "prefill_method": PREFILL_METHOD,
            "decode_tokens_per_s": (batch * (new_tokens - 1) / decode_s) if new_tokens > 1 and decode_s > 0 else None,
            "peak_gpu_bytes": peak, "peak_gpu_gib": None if peak is None else peak / 2**30,
            "model_gpu_bytes": model_device_bytes,
            "device_param_bytes": peer.device_param_bytes, "host_expert_bytes": peer.host_expert_bytes,
            "host_pinned": peer.host_pinned, "num_params": peer.num_params,
            "expert_fetch": ("accelerate AlignDevicesHook(offload=True) per expert module, weights_map = host "
                             "buffer views, synchronous copy per call" if mode == "on-demand" else None),
            "build_s": build_s, "versions": _versions(),
            "hf_config": {k: v for k, v in preset_hf_config.items() if k != "pregated_jax"},
            "tokens": tokens,
        }
    finally:
        peer.close()


def summary_line(r: dict[str, Any]) -> str:
    peak = "n/a" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.2f} GiB"
    return (f"{r['preset'] or 'custom'} {r['mode']} batch={r['batch']} beams={r['num_beams']} "
            f"in={r['input_len']} new={r['new_tokens']} on {r['device_name']}: {r['tokens_per_s']:.1f} tok/s "
            f"(e2e {r['e2e_s']:.3f} s, prefill {r['prefill_s']:.3f} s), peak {peak}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import os

    # `import pregated_jax` imports JAX; should anything start its GPU backend, don't let it take 75% of the
    # GPU memory the peer needs (the backend reads this when it starts, not at import).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from pregated_jax.config import get_preset

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True)
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--beams", type=int, default=1)
    ap.add_argument("--input_len", type=int, default=256)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no_pin", action="store_true", help="keep on-demand experts in pageable host memory")
    ap.add_argument("--json", help="write the result dict here")
    a = ap.parse_args(argv)
    r = run_hf_peer(get_preset(a.preset).to_hf_dict(), a.mode, a.batch, a.beams, input_len=a.input_len,
                    new_tokens=a.new_tokens, device=a.device, seed=a.seed, repeats=a.repeats,
                    pin_host=not a.no_pin, preset=a.preset)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    print(summary_line(r))
    return r


if __name__ == "__main__":
    main()
