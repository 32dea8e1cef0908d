"""`omnilite make-tiny` says what it wrote (every file with its size, then the total) and shows a
progress bar over its steps on stderr (none with --quiet)."""

import re

from omnilite.cli import main


def test_make_tiny_lists_every_file_with_its_size(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["make-tiny", "llama-omni", str(out)]) == 0
    printed, err = capsys.readouterr()
    files = sorted(f for f in out.rglob("*") if f.is_file())
    rows = [line.split() for line in printed.splitlines() if line.startswith("  ")]
    assert [r[0] for r in rows] == [str(f.relative_to(out)) for f in files]
    for (name, mib, unit), f in zip(rows, files):
        assert unit == "MiB" and abs(float(mib) - f.stat().st_size / 2**20) <= 0.005, name
    total = sum(f.stat().st_size for f in files) / 2**20
    assert re.search(rf": {len(files)} files, {total:.1f} MiB \(model dir ", printed)
    assert "make-tiny: 100%" in err and "3/3" in err  # the step bar


def test_quiet_make_tiny_prints_nothing(tmp_path, capsys):
    assert main(["make-tiny", "llama-omni", str(tmp_path / "ck"), "-q"]) == 0
    printed, err = capsys.readouterr()
    assert printed == "" and err == ""
