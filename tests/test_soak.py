"""Issue 29 item 6, short form: 60 mixed requests, 6 in flight, against ``swift deploy`` on loopback
(``benchmarks/soak_deploy.py`` runs the long form: 500 requests or 10 minutes)."""

from __future__ import annotations

import pytest

from qzoom_swift.testing.soak import DECISIONS, EXPECTED_ERRORS, KINDS, SoakSpec, format_report, run_soak

pytestmark = pytest.mark.slow  # two swift deploy start-ups and 60 requests: about two minutes on 2 CPUs


def test_deploy_holds_a_mixed_stream_of_60_requests(tiny_dir, tmp_path):
    report = run_soak(tiny_dir("qwen2_5_vl"), tmp_path, SoakSpec(requests=60, concurrency=6, max_seconds=300))
    text = format_report(report)
    assert report.sent == 60, text
    assert report.failed_unexpectedly == 0, text
    assert all(report.by_kind[kind]["sent"] > 0 for kind in KINDS), text  # the seeded mix holds every kind
    assert report.failed_as_expected == sum(report.by_kind[k]["sent"] for k in EXPECTED_ERRORS), text
    assert report.answered == sum(report.by_kind[k]["sent"] for k in DECISIONS), text
    assert report.decisions == {DECISIONS[k]: report.by_kind[k]["sent"] for k in DECISIONS}, text
    assert max(report.batch_sizes) > 1, text  # requests in flight reached the model together
    assert report.gate_probs["direct"] < report.tau_gate < report.gate_probs["zoom"], text
    assert 0 < report.rss_end_mib < 1.25 * report.rss_start_mib, text  # no runaway growth over the run
    assert 0 < report.p50_s <= report.p95_s, text
