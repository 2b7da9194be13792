"""Reading the native copies' custom calls out of compiled HLO text."""

import re


def custom_calls(hlo: str, target: str) -> list[tuple[str, list[str]]]:
    """(name, operand names) of every custom call to `target` in compiled HLO text, in schedule order."""
    calls = re.findall(r"%(\S+) = .*? custom-call\(([^)]*)\), custom_call_target=\"" + target + "\"", hlo)
    ops_of = lambda ops: [re.sub(r"/\*.*?\*/", "", o).strip().lstrip("%") for o in ops.split(",") if o.strip()]  # noqa: E731
    return [(name, ops_of(ops)) for name, ops in calls]  # (HLO text marks every 5th operand /*index=5*/)


def start_tokens(hlo: str) -> dict[str, str]:
    """{token value name: the pgj_fetch_start call that produced it} in compiled HLO text."""
    return {m[0]: m[1] for m in re.findall(r"%(\S+) = s32\[\] get-tuple-element\(%(\S+)\), index=2", hlo)}
