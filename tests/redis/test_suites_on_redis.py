"""The memory engine's behaviour tests of fan-out, history, recovery and AI answers, on Redis.

Each test below is the very function of the memory engine's suite, collected here again: in
this folder the ``broker`` and ``start_broker`` fixtures start brokers on a private
redis-server (``conftest.py``). Left out are the tests of the memory engine's own structures
(its cap, expiry buckets, accounting: Redis keeps history there), those that read its
synchronous API (``broker.engine.since``), and two that rest on its emits being fanned out
before ``emit_nowait`` returns (on Redis an emit reaches this node's subscribers when it comes
back from Redis, so a subscriber that joins or leaves meanwhile sees it, or not, accordingly):
``test_unsubscribe_stops_delivery`` and ``test_subscriber_sees_only_offsets_above_the_one_it_was_told``.
"""

from __future__ import annotations

from tests.abuse.test_replay import (  # noqa: F401
    test_a_catch_up_that_skipped_publications_says_so,
    test_a_publication_larger_than_a_page_is_replayed,
    test_a_replay_of_many_pages_racing_publications_arrives_exactly_once,
    test_an_exact_recovery_that_cannot_fit_says_so_and_replays_nothing,
)
from tests.broker.conftest import open_raw  # noqa: F401
from tests.broker.test_ai_chat import (  # noqa: F401
    test_a_watcher_cancels_with_ai_cancel,
    test_bad_chat_requests_are_named,
    test_max_tokens_ends_with_reason_length,
    test_one_answer_per_session_and_a_global_cap,
    test_rollup_joins_small_fast_tokens,
    test_the_time_limit_ends_in_ai_error_and_504,
    test_two_watchers_see_the_same_answer_then_done,
)
from tests.broker.test_fanout import (  # noqa: F401
    test_channels_stay_separate,
    test_client_handlers_like_the_browser_api,
    test_emit_validates_input,
    test_many_clients_get_every_event_in_order,
    test_pub_ping_hello_and_client_publish_policy,
)
from tests.broker.test_history import (  # noqa: F401
    test_catching_up_past_trimmed_history_gets_what_is_kept,
    test_catching_up_without_an_epoch_gets_the_stream_so_far,
    test_history_api_names_bad_queries,
    test_history_api_pages_through_a_channel,
    test_persist_override_on_emits,
    test_publications_racing_recoveries_arrive_exactly_once,
    test_reconnect_with_since_gets_exactly_what_was_missed,
    test_unrecoverable_positions_get_recovered_false_and_no_replay,
)
