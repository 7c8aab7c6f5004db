//! The behaviour suite: the document semantics of the API contract, written once
//! and run against every store over real gRPC. Adding a backend is one line in
//! the list at the bottom.

#[path = "../common/mod.rs"]
mod common;

mod differential;
mod documents;
mod errors;
mod expiry;
mod limits;
mod queries;
mod scopes;
mod support;
mod updates;
mod watch;
mod writes;

use differential::*;
use documents::*;
use errors::*;
use expiry::*;
use limits::*;
use queries::*;
use scopes::*;
use updates::*;
use watch::*;
use writes::*;

/// Instantiates every case for every backend.
macro_rules! suite {
    ([$($backend:ident => $variant:ident),* $(,)?], $cases:tt) => {
        $(suite!(@backend $backend $variant $cases);)*
    };
    (@backend $backend:ident $variant:ident [$($case:ident),* $(,)?]) => {
        mod $backend {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                crate::common::run(crate::common::Backend::$variant, super::$case).await
            })*
        }
    };
}

suite!(
    [
        memory => Memory,
        sqlite => Sqlite,
        postgres => Postgres,
        mariadb => Mariadb,
    ],
    [
        round_trips_every_json_type,
        save_is_an_upsert_with_fresh_revs,
        generated_ids_are_unique_and_time_sortable,
        conditional_saves,
        get_of_missing_documents,
        deletes,
        list_walks_in_id_byte_order,
        list_page_size_is_capped_at_1000,
        list_rejects_bad_requests,
        list_returns_survivors_exactly_once_during_inserts,
        batch_get_keeps_request_order,
        write_applies_all_across_collections,
        write_is_atomic,
        ids_are_stored_literally_and_collections_isolated,
        invalid_requests_name_the_rule,
        limits_of_depth_and_size,
        large_pages_stay_under_client_message_limits,
        concurrent_conditional_increments_lose_nothing,
        list_collections_is_sorted,
        health_and_reflection,
        behaves_like_the_memory_store,
        update_applies_a_merge_patch,
        transforms_apply_in_order,
        transforms_on_wrong_types_name_the_field,
        update_conditions,
        update_results_obey_the_document_rules,
        concurrent_increments_lose_nothing,
        deletes_may_allow_missing,
        write_mixes_saves_updates_and_deletes,
        expired_documents_are_absent_to_every_read_and_condition,
        update_keeps_the_expiry_and_save_clears_it,
        expiry_must_be_in_the_future,
        a_save_racing_the_reaper_wins,
        errors_carry_reasons_and_details,
        expected_rev_is_validated_and_never_echoed_whole,
        batch_get_stays_within_the_budget,
        queries_filter_with_typed_comparisons,
        queries_order_across_types,
        query_requests_are_validated,
        queries_agree_with_the_memory_store,
        watch_delivers_committed_changes_in_order,
        list_then_watch_misses_nothing,
        a_write_over_an_expired_document_reports_the_expiry,
        quiet_streams_send_progress,
        resume_tokens_are_validated,
    ]
);

/// Cases of services sharing one database: every store but memory, which
/// lives in one process.
mod shared {
    use super::*;

    suite!(
        [sqlite => Sqlite, postgres => Postgres, mariadb => Mariadb],
        [
            each_scope_sees_only_its_own_rows,
            read_only_and_hidden_fields_are_enforced,
        ]
    );
}
