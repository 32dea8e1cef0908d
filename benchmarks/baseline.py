"""Which precisions the PyTorch baseline runs in, and which one the speed ratios use.

A fair baseline is PyTorch as a user would run it on this host: bf16 where the CPU computes it
natively (x86 AVX-512 BF16 or AMX-BF16, Arm BF16), fp32 otherwise (bf16 without native support is
emulated through fp32 conversions and is slower than fp32). Where bf16 is native both precisions
run, and the ratios use the faster one by TTFA p50. The decision follows the CPU flags
(devices/host.py): PyTorch's own oneDNN check accepts any AVX-512 (BW/VL/DQ) CPU, where bf16 is
emulated, so it is only recorded beside the flags, and a build that says it has no bf16 skips it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from omnilite.devices.host import HostInfo

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class BaselinePlan:
    precisions: tuple[str, ...]  # always starts with fp32, the reference precision
    reason: str  # one sentence: why these precisions
    torch_view: dict  # what PyTorch itself reports (see torch_bf16_view)

    def to_dict(self) -> dict:
        return asdict(self)


def torch_bf16_view() -> dict:
    """PyTorch's own view of bf16 on this CPU: the kernel dispatch level and oneDNN's bf16 check (None
    where this PyTorch has no such probe)."""
    import torch

    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn_bf16_supported": bool(probe()) if probe is not None else None}


def plan_baseline(host: HostInfo, torch_view: dict) -> BaselinePlan:
    if not host.native_bf16:
        return BaselinePlan(("fp32",), f"bf16 skipped because this CPU has {host.bf16_reason()}: PyTorch would "
                                       "emulate it, slower than fp32 and not a fair baseline.", torch_view)
    if torch_view.get("mkldnn_bf16_supported") is False:
        return BaselinePlan(("fp32",), f"bf16 skipped: the CPU has {host.bf16_reason()}, but this PyTorch build "
                                       "reports no oneDNN bf16 support, so it would emulate bf16.", torch_view)
    return BaselinePlan(PRECISIONS, f"fp32 and bf16 both run because the CPU has {host.bf16_reason()}.", torch_view)


def headline(ttfa_p50_s: dict[str, float]) -> tuple[str, str]:
    """The precision the ratios use (the lowest TTFA p50) and the sentence saying which and why."""
    best = min(ttfa_p50_s, key=lambda p: ttfa_p50_s[p])
    if len(ttfa_p50_s) == 1:
        return best, f"The ratios use PyTorch {best}, the only precision run."
    others = ", ".join(f"{p} {ttfa_p50_s[p]:.3f} s" for p in ttfa_p50_s if p != best)
    return best, (f"The ratios use PyTorch {best}, the faster by TTFA p50 ({best} {ttfa_p50_s[best]:.3f} s vs "
                  f"{others}).")


def baseline_sentence(plan: dict, used: str, why: str) -> str:
    """The report's sentence naming the baseline precision (`plan` as stored: BaselinePlan.to_dict())."""
    return f"Baseline precision: PyTorch **{used}**. {why} Precisions run: {', '.join(plan['precisions'])}; {plan['reason']}"


def baseline_result(by_precision: dict[str, dict], plan: BaselinePlan, ttfa_s: dict[str, float]) -> dict:
    """The stored baseline: the fields of the precision the ratios use (fastest TTFA p50 among those in
    `ttfa_s`; fp32 when none has one), which one and why, the plan, and every precision's own result."""
    if ttfa_s:
        used, why = headline(ttfa_s)
    else:
        used, why = "fp32", "No precision has an end-to-end TTFA; the figures shown are fp32's."
    return {**by_precision[used], "precision": used, "why": why, "plan": plan.to_dict(), "by_precision": by_precision}
