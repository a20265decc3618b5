"""`unifuse info`: parameter and FLOP table."""

import re

from napari_unifuse.cli import main
from napari_unifuse.model import UniFuse, UniFuseConfig
from napari_unifuse.model.costs import measure
from napari_unifuse.model.mamba import SelectiveScan


def test_prints_parameters_per_module_and_flops(capsys):
    assert main(["info", "--preset", "small", "--dims", "2", "--size", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {m.group(1): m for line in lines
            if (m := re.match(r"(DAPL|OUFR|FA|UFR&F|total)\s+([\d,]+)\s+([\d.]+)", line))}
    model = UniFuse(UniFuseConfig.small(2))
    for label, module in (("DAPL", model.dapl), ("OUFR", model.oufr), ("FA", model.fa),
                          ("UFR&F", model.ufrf)):
        assert int(rows[label].group(2).replace(",", "")) == sum(
            p.numel() for p in module.parameters())
        assert float(rows[label].group(3)) > 0
    total = int(rows["total"].group(2).replace(",", ""))
    assert total == sum(p.numel() for p in model.parameters())
    assert any("analytically" in line for line in lines)


def test_scan_flops_are_the_analytic_estimate():
    config = UniFuseConfig.small(2)
    costs = {cost.label: cost for cost in measure(config, 32)}
    tokens = (32 // config.patch_size) ** 2
    # DAPL: MambaBlock 1 once + MambaBlock 2 on three orders; OUFR: three stages on 2N tokens.
    per_scan = SelectiveScan.flops(1, config.inner_dim, tokens, config.d_state)
    assert costs["DAPL"].scan_flops == 4 * per_scan
    assert costs["OUFR"].scan_flops == 3 * 2 * per_scan
    assert costs["FA"].scan_flops == costs["UFR&F"].scan_flops == 0


def test_size_not_divisible_is_a_clean_error(capsys):
    assert main(["info", "--preset", "small", "--dims", "2", "--size", "30"]) == 2
    assert "multiple of 4" in capsys.readouterr().err
