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


def early_table_readers(hlo: str) -> list[str]:
    """Instructions in compiled HLO text that read a pgj_fetch_start's tables other than its pgj_fetch_done.

    The native copies fill a start's tables behind XLA's back until the done has waited for them, so anything
    else that reads them (an XLA copy into a loop carry or an aliased output, a fusion) may read them early.
    """
    starts = [name for name, _ in custom_calls(hlo, "pgj_fetch_start")]
    tables = set()
    for start in starts:
        for name, index in re.findall(r"%(\S+) = \S+ get-tuple-element\(%" + re.escape(start) + r"\), index=(\d+)", hlo):
            if index != "2":  # outputs 0 and 1 are the tables, 2 the token
                tables.add(name)
    readers = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (.*)", line)
        if m is None or 'custom_call_target="pgj_fetch_done"' in line:
            continue
        body = m.group(2)
        if "get-tuple-element(" in body and any(f"get-tuple-element(%{s})" in body for s in starts):
            continue  # the extraction of a table itself
        if tables & set(re.findall(r"%([\w.\-]+)", body.split(", metadata=")[0])):
            readers.append(line.strip()[:200])
    return readers
