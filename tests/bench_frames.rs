//! `tmem-bench frames` end to end on a small corpus, parsed as the command
//! line is: the rates are for the benchmark to report; checked here is that
//! every page of every form came back (the run fails otherwise) and that
//! the sizes and fragmentation are where they must be whatever the machine.

use clap::Parser;
use vhost_user_tmem::bench::{
    frames::{run_bench, Form},
    BenchCommand,
};

#[test]
fn frames_round_trip_every_page_and_report_each_size() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.raw");
    let data: Vec<u8> = (0..200usize)
        .flat_map(|p| {
            format!("page {p} of a guest's heap, {} ", p * 7919)
                .into_bytes()
                .into_iter()
                .cycle()
                .take(4096)
        })
        .collect();
    std::fs::write(&corpus, data).unwrap();
    let argv = [
        "tmem-bench",
        "frames",
        "--corpus",
        corpus.to_str().unwrap(),
        "--frames",
        "1,8",
        "--invalidate",
        "0.5",
        "--json",
    ];
    let BenchCommand::Frames(args) = BenchCommand::parse_from(argv) else {
        panic!("not the frames subcommand");
    };
    let r = run_bench(&args).unwrap();
    assert_eq!((r.pages, r.spilled_pages), (200, 200));
    assert_eq!(r.rows.len(), 6);
    for row in &r.rows {
        assert_eq!(row.fragmentation[0].live_pages, 100);
        if row.pages_per_frame == 1 {
            assert_eq!(row.fragmentation[0].stranded_share, 0.0);
        } else {
            assert!(row.fragmentation[0].stranded_share > 0.0);
            assert!(row.read_bytes_per_get > 4.0 * row.file_bytes_per_page);
        }
    }
    let packed8 = r
        .rows
        .iter()
        .find(|x| x.form == Form::Packed && x.pages_per_frame == 8)
        .unwrap();
    assert!(packed8.file_vs_single.unwrap() < 1.0);
}
