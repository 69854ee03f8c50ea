"""``python -m bench.abuse`` end to end, small: one cheap attack against a real broker and swarm."""

from __future__ import annotations

from bench import abuse


def test_a_pub_flood_run_reports_both_streams_the_attackers_and_the_memory() -> None:
    result = abuse.run(abuse.Params(attack="pub", subscribers=100, tokens=50, hostile=10, warmup=0.5,
                                    history_tokens=100, time_limit=20))
    baseline, attacked = result["baseline"], result["under_attack"]
    # Every honest subscriber got every token, with and without the attack (a CPU-bound attack
    # may delay them, never lose them).
    assert baseline["complete"] and attacked["complete"], result
    assert (attacked["expected"], attacked["delivered"]) == (100 * 50, 100 * 50)
    assert result["p99_baseline_ms"] > 0 and result["p99_attack_ms"] > 0
    assert result["p99_ratio"] == round(result["p99_attack_ms"] / result["p99_baseline_ms"], 2)
    # The attackers connected and were answered (rate limited: err 4011, or refused as too large).
    pub = attacked["attackers"]["attacks"]["pub"]
    assert pub["connections"] >= 10 and pub["answers"] > 0, pub
    assert attacked["rss_ceiling_hit_s"] is None and not attacked["broker_killed"]
    assert 0 < attacked["base_rss_mib"] <= attacked["peak_rss_mib"]
    assert result["memory_limit_mib"] == 256 and attacked["health"]["memory_limit"] == 256 * abuse.MiB
    assert result["rss_met"] == (attacked["peak_rss_mib"] <= result["rss_bound_mib"])
    assert result["broker_exit_code"] == 0
    assert "6. pub ai:cancel flood" in abuse.table([result])
    assert abuse.counts("all", None) == {"replay": 167, "nonreaders": 167, "history": 167, "fragments": 167,
                                         "flood": 166, "pub": 166}
