"""The IMDSv2 token table on an injected clock: bounded, expired tokens dropped first, then the oldest."""

from imsa.server.imds import TokenTable


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_full_table_drops_the_oldest_token_when_none_has_expired():
    clock = Clock()
    table = TokenTable(clock=clock, limit=3)
    first, second, third = (table.issue(21600) for _ in range(3))
    fourth = table.issue(21600)
    assert len(table) == 3
    assert not table.valid(first)
    assert all(table.valid(token) for token in (second, third, fourth))


def test_a_full_table_drops_expired_tokens_before_the_oldest():
    clock = Clock()
    table = TokenTable(clock=clock, limit=3)
    oldest = table.issue(21600)
    short = table.issue(10)
    newer = table.issue(21600)
    clock.now += 11
    latest = table.issue(21600)
    assert len(table) == 3
    assert not table.valid(short)
    assert all(table.valid(token) for token in (oldest, newer, latest))


def test_a_short_token_issued_after_long_ones_is_still_swept_first_once_expired():
    clock = Clock()
    table = TokenTable(clock=clock, limit=3)
    long_lived = [table.issue(21600) for _ in range(2)]
    table.issue(21600)  # full: the table now knows nothing expires for hours
    table.issue(5)  # evicts the oldest; must lower that bound again
    clock.now += 6
    latest = table.issue(21600)
    assert not table.valid(long_lived[0])
    assert table.valid(long_lived[1]) and table.valid(latest)
    assert len(table) == 3


def test_expired_tokens_are_refused_even_before_they_are_swept():
    clock = Clock()
    table = TokenTable(clock=clock, limit=10)
    token = table.issue(1)
    assert table.valid(token)
    clock.now += 1
    assert not table.valid(token)


def test_the_table_holds_the_documented_10000_tokens():
    # The README documents the bound; a literal here, so that changing it is a visible decision.
    clock = Clock()
    table = TokenTable(clock=clock)
    tokens = [table.issue(21600) for _ in range(10_000)]
    assert len(table) == 10_000 and table.valid(tokens[0])
    newest = table.issue(21600)
    assert len(table) == 10_000
    assert not table.valid(tokens[0]) and table.valid(tokens[1]) and table.valid(newest)
