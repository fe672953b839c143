"""``clickrank load-history``: MovieLens ratings bulk-loaded into a real Redis through HistoryStore."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import redis

from clickrank.cli import main
from models.redis_process import free_port
from service.load_history import load_history_command
from service.settings import Settings

LIMIT = 3000
CAP = 40


def data_keys(client: redis.Redis) -> set[str]:
    """Every key but the short-lived cached results of append calls."""
    return {key for key in client.scan_iter() if ":batch:" not in key}


def first_ratings(data_dir: Path, limit: int | None) -> list[tuple[str, str, float, int]]:
    """(user, item, rating, ts) of the first ``limit`` ratings by time, read straight from u.data."""
    rows = []
    for line in (data_dir / "u.data").read_text(encoding="latin-1").splitlines():
        if line.strip():
            user, item, rating, ts = line.split()
            rows.append((user, item, float(rating), int(ts)))
    rows.sort(key=lambda row: row[3])  # a stable sort: file order breaks ties, as the loader does
    return rows if limit is None else rows[:limit]


def settings_for(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, history_cap=CAP, history_length=CAP, redis_prefix="ml:")


def test_a_slice_lands_in_redis_and_a_rerun_stores_nothing_twice(
    data_dir: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = first_ratings(data_dir, LIMIT)
    per_user = Counter(user for user, *_ in expected)
    seen = defaultdict(set)
    for user, item, *_ in expected:
        seen[user].add(item)

    summary = load_history_command(data_dir, limit=LIMIT, settings=settings_for(redis_url))
    assert (summary.events, summary.users, summary.accepted, summary.duplicates) == (
        LIMIT,
        len(per_user),
        LIMIT,
        0,
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and f"{LIMIT} events of {len(per_user)} users" in out[0]

    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        for user, count in per_user.items():
            assert client.zcard(f"ml:h:{user}") == min(count, CAP)
            assert client.smembers(f"ml:s:{user}") == seen[user]
        heavy = per_user.most_common(1)[0][0]
        stored = client.zrange(f"ml:h:{heavy}", 0, -1, withscores=True)
        want = [row for row in expected if row[0] == heavy][-CAP:]
        assert [int(score) for _, score in stored] == [ts for *_, ts in want]
        assert client.zcard("ml:trend") == len({item for _, item, *_ in expected})
        keys_before = data_keys(client)

    again = load_history_command(data_dir, limit=LIMIT, settings=settings_for(redis_url))
    assert (again.accepted, again.duplicates) == (0, LIMIT)
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        assert sum(client.zcard(f"ml:h:{user}") for user in per_user) == sum(
            min(c, CAP) for c in per_user.values()
        )
        assert data_keys(client) == keys_before


def test_cli_loads_through_the_environment(
    data_dir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLICKRANK_REDIS_URL", redis_url)
    assert main(["load-history", "--data-dir", str(data_dir), "--limit", "500"]) == 0
    assert "500 events" in capsys.readouterr().out
    with redis.Redis.from_url(redis_url) as client:
        assert client.exists("cr:trend")


def test_cli_redis_down_is_a_one_line_error(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLICKRANK_REDIS_URL", f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    assert main(["load-history", "--data-dir", str(data_dir), "--limit", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach Redis" in err[0]
    assert "s3cret" not in err[0]


def test_bad_limit_is_rejected(data_dir: Path, redis_url: str) -> None:
    with pytest.raises(ValueError, match="--limit"):
        load_history_command(data_dir, limit=0, settings=settings_for(redis_url))


@pytest.mark.slow
def test_the_whole_data_set_loads_in_seconds(data_dir: Path, redis_url: str) -> None:
    expected = first_ratings(data_dir, None)
    summary = load_history_command(data_dir, settings=Settings(redis_url=redis_url))
    assert summary.accepted == len(expected) and summary.duplicates == 0
    assert summary.seconds < float(os.environ.get("CLICKRANK_TEST_LOAD_BUDGET_S", "30"))
    with redis.Redis.from_url(redis_url) as client:
        assert sum(client.scard(f"cr:s:{u}") for u in {r[0] for r in expected}) == len(
            {(u, i) for u, i, *_ in expected}
        )
