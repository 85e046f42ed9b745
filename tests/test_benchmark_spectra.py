"""benchmarks.spectra --quick: the report parses, the plot exists, and the spectra say what the
math says (a smoke run in CI; the numbers themselves are the benchmark's business)."""

import json

from benchmarks.spectra import main


def test_quick_spectra_report(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    rows = {r["update"]: r for r in json.loads((tmp_path / "spectra.json").read_text())["rows"]}
    assert (tmp_path / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"gradient", "momentum (Nesterov U)", "AdamW update", "newton_schulz", "deepseek_v4"} <= set(rows)
    # DeepSeek-V4's convergent tail: σ within 0.2% of 1 for σ/‖U‖_F ≥ 1e-4 (spec §2.5); this U's
    # spread is 2e-4, so every σ lands in [0.99, 1.01] (measured 0.999-1.001).
    assert 0.99 <= rows["deepseek_v4"]["sigma_min"] <= rows["deepseek_v4"]["sigma_max"] <= 1.01
    # NS5 maps σ into its band, max 1.2024 (the scalar map's maximum, spec §2.1), and does not
    # converge for the small σ of a momentum matrix: far from flat, unlike the raw spread of 1e-4.
    assert rows["newton_schulz"]["sigma_max"] <= 1.2025
    assert rows["momentum (Nesterov U)"]["ratio"] < 1e-2 < rows["newton_schulz"]["ratio"]
