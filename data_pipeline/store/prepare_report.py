"""What `prepare` says about each source: the report it prints, and the checks that refuse a
source as a whole (no sample kept, too many records skipped)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from data_pipeline.errors import SkipExample, SourceRejected
from data_pipeline.spec import DataConfig, SourceSpec
from data_pipeline.store.tokenize_chunk import ChunkResult


@dataclass
class SourceReport:
    name: str
    reused: bool
    records: int = 0
    """Records read (JSONL lines, array elements, text lines, Parquet rows), good or bad."""
    samples: int = 0
    """Training samples written: one per kept conversation; a text document longer than seq_len
    gives several (consecutive seq_len pieces)."""
    tokens: int = 0
    response_tokens: int = 0
    truncated: int = 0
    duplicates: int = 0
    skips: dict = field(default_factory=dict)
    excluded: int = 0
    """Skipped records left out by a declared rule (e.g. KTO label false): not bad records."""
    examples: list = field(default_factory=list)
    seconds: float = 0.0
    files: list = field(default_factory=list)
    detected_format: str = ""
    rendering: dict = field(default_factory=dict)
    """Counted outcomes of rendering and truncation (ChunkResult.template_counts): reasoning turns
    rendered or dropped by the template, samples split per turn, truncations by kind."""

    @property
    def skipped(self) -> int:
        """Records left out, for any reason (declared exclusions included)."""
        return sum(self.skips.values())

    @property
    def bad_records(self) -> int:
        """Records left out because they are unusable (declared exclusions are not bad)."""
        return self.skipped - self.excluded

    @property
    def kept(self) -> int:
        return self.records - self.skipped

    def lines(self) -> list[str]:
        state = "reused (inputs, tokenizer and settings unchanged)" if self.reused else f"{self.seconds:.1f}s"
        files = f" from {_plural(len(self.files), 'file')}" if self.files else ""
        excluded = f" ({self.excluded} of them excluded by rule)" if self.excluded else ""
        head = (f"{self.name}: {_plural(self.records, 'record')} read{files}, {self.kept} kept, {self.skipped} "
                f"skipped{excluded} -> {_plural(self.samples, 'sample')}, {self.tokens} tokens, {self.response_tokens} "
                f"response tokens, {self.truncated} truncated, {state}")
        out = [head]
        if self.samples > self.kept:
            out.append(f"  {self.samples - self.kept} more samples than kept records: text documents longer "
                       "than seq_len are split into seq_len pieces")
        if self.duplicates:
            out.append(f"  exact duplicates: {self.duplicates} samples repeat an earlier sample of this source "
                       f"({self.duplicates / max(self.samples, 1):.1%}); data.dedup=exact trains on each once")
        out.extend(_rendering_lines(self.rendering))
        if self.skips:
            out.append("  skipped: " + _skip_counts(self.skips))
            out.extend("    " + line for line in _example_lines(self.examples, 6))
        return out


def _rendering_lines(counts: dict) -> list[str]:
    out = []
    whole, cut = counts.get("truncated_whole_turns", 0), counts.get("truncated_prompt_cut", 0)
    if whole or cut:
        out.append(f"  truncated at whole messages: {whole} lost their oldest exchanges, {cut} also had the start of "
                   "their last user message cut (data.truncation)")
    turns = counts.get("reasoning_turns", 0)
    if turns:
        rendered, dropped = counts.get("reasoning_rendered", 0), counts.get("reasoning_dropped_by_template", 0)
        line = f"  reasoning: {turns} turns with reasoning, {rendered} trained, {dropped} dropped by the template"
        split = counts.get("reasoning_split_samples", 0)
        if split:
            line += f"; {split} samples made one per assistant turn (data.reasoning_turns=every_turn)"
        out.append(line)
        if dropped and not rendered:
            out.append("  warning: the template renders none of this source's reasoning (its template ignores "
                       "reasoning_content?): choose one that renders it (e.g. qwen3, deepseek-r1, chatml)")
        elif dropped:
            out.append("  note: the template keeps only the reasoning after the last user message, as at inference; "
                       "data.reasoning_turns=every_turn trains every turn's reasoning")
    return out


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _skip_counts(skips: dict) -> str:
    """reason=count, most frequent first."""
    return ", ".join(f"{k}={v}" for k, v in sorted(skips.items(), key=lambda kv: (-kv[1], kv[0])))


def _example_lines(examples: list, limit: int) -> list[str]:
    out = []
    for ex in examples[:limit]:
        if not isinstance(ex, SkipExample):  # read back from a manifest
            ex = SkipExample(**{k: ex.get(k) for k in ("reason", "file", "line", "field", "message", "index")})
        field_text = f" {ex.field}" if ex.field else ""
        out.append(f"{ex.location()} [{ex.reason}]{field_text}: {ex.message}")
    return out


def check_source(report: SourceReport, spec: SourceSpec, data_cfg: DataConfig, key: str) -> None:
    """A source that keeps no sample, or (on_error=skip) skips more than data.max_skip_fraction of
    its records, is an error naming it, its files and what was skipped: a wrong format or a broken
    file must stop prepare, not surface later as a crash or a run on a sliver of the data."""
    files = ", ".join(report.files[:3]) + (f" and {len(report.files) - 3} more files" if len(report.files) > 3 else "")
    where = f"source {report.name!r} ({key})"
    detail = ""
    if report.skips:
        examples = _example_lines(report.examples, 2)
        detail = f"; skipped: {_skip_counts(report.skips)}" + (f"; e.g. {' | '.join(examples)}" if examples else "")
    fmt = f" (format {spec.format}" + (f", detected {report.detected_format})" if spec.format == "auto" and
                                       report.detected_format else ")")
    if report.samples == 0:
        raise SourceRejected(f"{where}: no sample kept of its {_plural(report.records, 'record')}{detail}. Check "
                             f"the source's format{fmt} and its records", file=files or spec.path,
                             reason="empty_source")
    fraction = report.bad_records / max(report.records, 1)
    if data_cfg.on_error == "skip" and fraction > data_cfg.max_skip_fraction:
        raise SourceRejected(
            f"{where}: {report.bad_records} of {report.records} records skipped ({fraction:.1%}), more than "
            f"data.max_skip_fraction={data_cfg.max_skip_fraction} allows{detail}. Fix the data, check the "
            f"format{fmt}, or raise data.max_skip_fraction (--max-skip-fraction)", file=files or spec.path,
            reason="too_many_skips")


def merge_result(report: SourceReport, result: ChunkResult) -> None:
    report.records += result.records
    report.samples += result.samples
    report.tokens += result.tokens
    report.response_tokens += result.response_tokens
    report.truncated += result.truncated
    report.excluded += result.excluded
    for name, count in result.template_counts.items():
        report.rendering[name] = report.rendering.get(name, 0) + count
    for reason, count in result.skips.items():
        report.skips[reason] = report.skips.get(reason, 0) + count
    shown = Counter(e.reason for e in report.examples)
    for ex in result.examples:
        if shown[ex.reason] < 3:
            report.examples.append(ex)
            shown[ex.reason] += 1


def report_from_manifest(manifest: dict) -> SourceReport:
    counts = manifest["counts"]
    return SourceReport(manifest["source"], reused=True, records=counts["records"], samples=counts["samples"],
                        tokens=counts["tokens"], response_tokens=counts["response_tokens"],
                        truncated=counts["truncated"], duplicates=counts.get("duplicate_samples", 0),
                        skips=manifest.get("skips", {}), excluded=counts.get("excluded", 0),
                        examples=manifest.get("skip_examples", []),
                        files=manifest.get("files", []), detected_format=manifest.get("detected_format", ""),
                        rendering=manifest.get("rendering", {}))


def format_report(reports: list[SourceReport]) -> str:
    return "\n".join(["prepare report:"] + [line for r in reports for line in r.lines()])
