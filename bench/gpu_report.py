"""bench/gpu.py's per-shape report: the JSON object (headline numbers as flat keys, details
nested), the targets judged on it, and its table."""

from __future__ import annotations

from typing import Any

from gpu_models import Shape
from gpu_systems import Settings, SystemRun


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def shape_report(shape: Shape, s: Settings, gbps: float, tandem: SystemRun,
                 profile: dict[str, Any], hf: SystemRun, hf_static: SystemRun | None,
                 parity: dict[str, Any], elapsed: float, model_dir: str) -> dict[str, Any]:
    """Ratios are Tandem / baseline, both measured in this run on this device."""
    read_bytes = tandem.info["decode_read_bytes"]
    roofline = gbps * 1e9 / read_bytes
    report: dict[str, Any] = {
        "shape": shape.name, "device": s.device.type, "dtype": s.dtype,
        "memory_read_gbps": gbps, "decode_read_bytes": read_bytes,
        "roofline_decode_tok_s_b1": roofline,
        "decode_b1_vs_roofline": ratio(tandem.decode.get(1), roofline),
    }
    for b in s.batches:
        report[f"tandem_decode_tok_s_b{b}"] = tandem.decode[b]
        report[f"hf_decode_tok_s_b{b}"] = hf.decode[b]
        report[f"decode_b{b}_vs_hf"] = ratio(tandem.decode[b], hf.decode[b])
        if hf_static is not None:
            report[f"hf_static_decode_tok_s_b{b}"] = hf_static.decode[b]
            report[f"decode_b{b}_vs_hf_static"] = ratio(tandem.decode[b], hf_static.decode[b])
    report.update({
        "tandem_prefill_tok_s": tandem.prefill, "hf_prefill_tok_s": hf.prefill,
        "prefill_vs_hf": ratio(tandem.prefill, hf.prefill),
        "kernels_per_decode_step": profile["kernels_per_step"],
        "gpu_busy_b1": profile["gpu_busy"],
        "logits_max_abs_diff_fp32": parity["logits_max_abs_diff"],
        "greedy_tokens_matching_fp32": parity["greedy_tokens_matching"],
        "greedy_tokens_total_fp32": parity["greedy_tokens_total"],
        "greedy_equal_fp32": parity["greedy_equal"],
        "settings": {"batches": s.batches, "prompt_len": s.prompt_len,
                     "decode_tokens": s.decode_tokens, "prefill_prompts": s.prefill_prompts,
                     "prefill_len": s.prefill_len, "repeats": s.repeats,
                     "cuda_graphs": s.cuda_graphs},
        "config": shape.describe(), "model_dir": model_dir,
        "tandem": tandem.to_json(), "hf": hf.to_json(),
        "hf_static": None if hf_static is None else hf_static.to_json(),
        "profile_b1": profile, "parity_fp32": parity,
    })
    report["targets"] = [
        {"name": name, "key": key, "value": report.get(key), "target": minimum,
         "met": None if report.get(key) is None else report[key] >= minimum}
        for name, key, minimum in shape.targets]
    report["elapsed_s"] = round(elapsed, 1)
    return report


def fmt(value: float | None, spec: str = ",.1f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_shape(r: dict[str, Any]) -> None:
    """The table of one shape's report (or its error)."""
    print(f"\n== {r['shape']} ==")
    if "error" in r:
        print(f"FAILED: {r['error']}")
        return
    static = r["hf_static"] is not None
    head = f"{'metric':<24} {'tandem':>12} {'hf eager':>12} {'vs hf':>7}"
    print(head + (f" {'hf static':>12} {'vs static':>9}" if static else ""))
    print("-" * (len(head) + (23 if static else 0)))
    for b in r["settings"]["batches"]:
        line = (f"{f'decode tok/s, batch {b}':<24} {fmt(r[f'tandem_decode_tok_s_b{b}']):>12} "
                f"{fmt(r[f'hf_decode_tok_s_b{b}']):>12} {fmt(r[f'decode_b{b}_vs_hf'], '.2f'):>7}")
        if static:
            line += (f" {fmt(r[f'hf_static_decode_tok_s_b{b}']):>12} "
                     f"{fmt(r[f'decode_b{b}_vs_hf_static'], '.2f'):>9}")
        print(line)
    st = r["settings"]
    label = f"prefill tok/s, {st['prefill_prompts']}x{st['prefill_len']}"
    print(f"{label:<24} "
          f"{fmt(r['tandem_prefill_tok_s']):>12} {fmt(r['hf_prefill_tok_s']):>12} "
          f"{fmt(r['prefill_vs_hf'], '.2f'):>7}")
    print(f"read bandwidth {fmt(r['memory_read_gbps'])} GB/s, {r['decode_read_bytes'] / 1e9:.3f} "
          f"GB read per b1 step: roofline {fmt(r['roofline_decode_tok_s_b1'])} tok/s, Tandem b1 "
          f"at {fmt(_percent(r['decode_b1_vs_roofline']), '.0f')}% of it")
    p = r["profile_b1"]
    if p["kernels_per_step"] is not None:
        print(f"b1 decode step ({p['steps']} profiled): {p['kernels_per_step']:.1f} kernels, "
              f"{p['wall_ms_per_step']:.3f} ms wall, GPU busy {100 * p['gpu_busy']:.1f}% "
              f"(union; sum {100 * p['gpu_kernel_sum']:.1f}%), "
              f"{p['graph_replays_per_step']:.2f} graph replays")
    else:
        print(f"b1 decode step ({p['steps']} profiled, CPU: no kernels, GPU busy n/a): "
              f"{p['cpu_ops_per_step']:.1f} CPU op events, {p['wall_ms_per_step']:.3f} ms wall")
    q = r["parity_fp32"]
    print(f"float32: logits max |diff| {q['logits_max_abs_diff']:.3g} (max |logit| "
          f"{q['logits_max_abs']:.3g}); greedy tokens equal {q['greedy_tokens_matching']} of "
          f"{q['greedy_tokens_total']} (leading)")
    for t in r["targets"]:
        verdict = "n/a" if t["met"] is None else "met" if t["met"] else "MISS"
        print(f"  target {t['name']:<24} {fmt(t['value'], ',.2f'):>10}  {verdict}")


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value
