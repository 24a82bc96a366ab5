"""An inspection report (``ldm.data.shard_inspection.InspectionReport``) as a readable text block."""

from __future__ import annotations

from ldm.data.shard_inspection import InspectionReport


def _number(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}"


def _bytes(value: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def format_report(report: InspectionReport) -> str:
    """The report as a readable text block: totals, a statistics table, formats, bad samples and shards."""
    lines = [
        f"shards   {report.num_shards}   samples {report.num_samples}   total {_bytes(report.total_bytes)}",
        "",
        f"{'':<16}{'min':>10}{'median':>10}{'p95':>10}{'max':>10}{'mean':>10}",
    ]
    rows = [
        ("bytes/shard", report.shard_bytes, _bytes),
        ("bytes/sample", report.sample_bytes, _bytes),
        ("caption chars", report.caption_chars, _number),
        ("caption words", report.caption_words, _number),
        ("width", report.width, _number),
        ("height", report.height, _number),
        ("aspect w/h", report.aspect, _number),
    ]
    for name, stats, fmt in rows:
        if stats is None:
            lines.append(f"{name:<16}{'-':>10}")
        else:
            lines.append(
                f"{name:<16}" + "".join(f"{fmt(stats[k]):>10}" for k in ("min", "median", "p95", "max", "mean"))
            )
    formats = ", ".join(f"{ext} {count}" for ext, count in report.image_formats.items()) or "-"
    sources = (
        ", ".join(
            f".{src} {count}" if src == "json" else f"image {src} {count}"
            for src, count in report.resolution_source.items()
        )
        or "-"
    )
    lines += ["", f"image members   {formats}", f"resolution from {sources}", ""]
    if report.bad_samples or report.bad_shards:
        reasons = ", ".join(f"{count} {reason}" for reason, count in report.bad_by_reason.items())
        lines.append(f"bad samples     {report.bad_samples} of {report.num_samples} ({reasons})")
        lines += [f"  {e['shard']} {e['key']}: {e['reason']} {e['detail']}".rstrip() for e in report.bad_examples[:10]]
        lines += [f"  {s['reason']} {s['shard']}: {s['detail']}" for s in report.bad_shards]
    else:
        lines.append(f"bad samples     0 of {report.num_samples}")
    return "\n".join(lines)
