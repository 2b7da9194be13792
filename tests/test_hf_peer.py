"""The HF peer benchmark on CPU with the tiny preset: both placements run and generate identical tokens."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from pregated_jax.bench.hf_peer import HFPeer, run_hf_peer  # noqa: E402
from pregated_jax.config import get_preset  # noqa: E402

FIELDS = ("mode", "device", "batch", "num_beams", "input_len", "new_tokens", "e2e_s", "e2e_s_all", "tokens_per_s",
          "prefill_s", "prefill_method", "peak_gpu_bytes", "device_param_bytes", "host_expert_bytes", "num_params",
          "versions", "hf_config", "tokens", "device_name")


@pytest.mark.parametrize("batch,beams", [(2, 1), (1, 2)])
def test_modes_generate_identical_tokens(batch, beams):
    hf = get_preset("tiny").to_hf_dict()
    kw = dict(batch=batch, num_beams=beams, input_len=16, new_tokens=4, device="cpu", seed=3, repeats=1)
    gpu_only = run_hf_peer(hf, "gpu-only", **kw)
    on_demand = run_hf_peer(hf, "on-demand", **kw)
    for r in (gpu_only, on_demand):
        assert all(f in r for f in FIELDS)
        assert len(r["tokens"]) == batch and all(len(t) == 4 for t in r["tokens"])
        assert r["tokens_per_s"] == pytest.approx(batch * 4 / r["e2e_s"])
        assert r["peak_gpu_bytes"] is None and "pregated_jax" not in r["hf_config"]
        assert set(r["versions"]) >= {"torch", "transformers", "accelerate"}
    assert on_demand["tokens"] == gpu_only["tokens"]
    assert gpu_only["num_params"] == on_demand["num_params"]
    assert gpu_only["host_expert_bytes"] == 0
    # on-demand: the experts live only in the host buffer; the device holds the rest.
    assert on_demand["host_expert_bytes"] + on_demand["device_param_bytes"] == gpu_only["device_param_bytes"]


def test_on_demand_experts_stay_host_resident_through_a_forward():
    hf = get_preset("tiny").to_hf_dict()
    peers = {m: HFPeer(hf, m, device="cpu", seed=0) for m in ("gpu-only", "on-demand")}
    try:
        od = peers["on-demand"]
        expert_params = {n: p for n, p in od.model.named_parameters() if ".experts.expert_" in n}
        assert expert_params and all(p.device.type == "meta" and p.dtype == torch.bfloat16
                                     for p in expert_params.values())
        assert od.host_buffer.device.type == "cpu"
        ids = torch.randint(2, 128, (2, 8), generator=torch.Generator().manual_seed(0))
        dec = torch.zeros((2, 3), dtype=torch.long)
        with torch.inference_mode():
            logits = {m: p.model(input_ids=ids, decoder_input_ids=dec).logits for m, p in peers.items()}
        torch.testing.assert_close(logits["on-demand"], logits["gpu-only"], rtol=0, atol=0)
        assert all(p.device.type == "meta" for n, p in od.model.named_parameters() if n in expert_params)
        # Non-expert weights are identical objects' values in both placements (same generator order).
        ref = dict(peers["gpu-only"].model.named_parameters())
        for n, p in od.model.named_parameters():
            if n not in expert_params:
                assert torch.equal(p, ref[n]), n
    finally:
        for p in peers.values():
            p.close()
