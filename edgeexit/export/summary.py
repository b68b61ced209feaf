"""The table ``edgeexit export`` prints for a bundle (torch-free)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..runtime.bundle import Bundle

__all__ = ["bundle_rows", "print_bundle_table"]


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def bundle_rows(bundle: Bundle) -> List[Dict[str, Any]]:
    """One row per model file: file, MACs, params, size (bytes), parity (kind -> max abs error) and engine."""
    per_file: Dict[str, Dict[str, float]] = ((bundle.checks or {}).get("per_file") or {})
    rows = []
    for f in bundle.files():
        size = f.path.stat().st_size if f.path.is_file() else 0
        rows.append({
            "file": f.file, "macs": f.macs, "params": f.params, "size": size,
            "parity": dict(per_file.get(f.file, {})),
            "engine": None if f.engine is None else f"{f.engine.file} ({f.engine.precision})",
        })
    return rows


def print_bundle_table(bundle: Bundle, console: Optional[Any] = None) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = bundle_rows(bundle)
    checks = bundle.checks or {}
    title = f"bundle {bundle.path}: {bundle.num_exits} exits, {bundle.num_classes} classes, policy {bundle.policy.gate}"
    table = Table(title=title)
    for col in ("file", "MACs", "params", "size", "max |ONNX Runtime - torch|"):
        table.add_column(col, justify="left" if col in ("file", "max |ONNX Runtime - torch|") else "right")
    with_engines = any(r["engine"] for r in rows)
    if with_engines:
        table.add_column("TensorRT engine")
    for r in rows:
        parity = ", ".join(f"{k} {v:.1e}" for k, v in r["parity"].items()) if r["parity"] else "not checked"
        cells = [r["file"], _human(r["macs"]), _human(r["params"]), _human(r["size"], "B"), parity]
        if with_engines:
            cells.append(r["engine"] or "-")
        table.add_row(*cells)
    console = console or Console()
    console.print(table)
    if checks:
        d = checks.get("decisions", {})
        worst = checks.get("max_abs_error", {})
        console.print(
            f"parity on {checks.get('samples')} {checks.get('inputs')} inputs (tolerance {checks.get('tolerance')}): "
            + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
            + f"; chained decisions {d.get('equal')}/{d.get('compared')} equal ({d.get('near_threshold')} near a threshold)"
        )
    total = sum(r["size"] for r in rows)
    console.print(f"total {_human(total, 'B')}; plain network {_human(bundle.reference_macs)} MACs; "
                  f"leaving at exit i costs {', '.join(f'{100 * c:.0f}%' for c in bundle.cumulative_fraction)}")
