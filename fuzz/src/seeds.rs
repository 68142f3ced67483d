//! The seed corpus, as code: `fuzz/corpus/<target>/seed-*` are these inputs,
//! and `regression-*` the crash inputs fuzzing found, kept once fixed.
//! The test below fails when the files differ from what is built here; run it
//! with `TMEM_WRITE_SEEDS=1` to write them. Inputs libFuzzer finds and keeps
//! live beside them.

use vhost_user_tmem::store::DedupDomain;

use crate::{
    device_chain::{self as dc, seeds::*, AddrSpec, Batch, Cmd, DescSpec, LenSpec},
    pages::Content,
    store_ops::{self as so, Fault, Op, Setup},
};

fn batch(cmds: Vec<Cmd>, heads: Vec<u8>) -> Batch {
    Batch {
        cmds,
        heads,
        used_event: 0,
    }
}

fn device(queue_size: u16, event_idx: bool, tight: u8, batches: Vec<Batch>) -> Vec<u8> {
    dc::Input {
        queue_size,
        event_idx,
        tight,
        batches,
    }
    .to_bytes()
}

fn device_chain() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // Every op, one chain per batch, then two chains in one batch.
    out.push((
        "ops",
        device(
            16,
            false,
            0,
            vec![
                batch(direct(0, 0, 1, 0, 1, 2, Content::Random(3)), vec![0]),
                batch(direct(4, 0x100, 5, 0, 1, 3, Content::Zero), vec![4]),
                batch(direct(0, 0x200, 2, 0, 1, 2, Content::Zero), vec![0]),
                batch(direct(4, 0x300, 2, 1, 1, 3, Content::Zero), vec![4, 4]),
                batch(direct(8, 0x400, 3, 0, 1, 2, Content::Zero), vec![8, 0]),
                batch(direct(0, 0x500, 4, 0, 1, 0, Content::Zero), vec![0]),
            ],
        ),
    ));
    out.push((
        "indirect",
        device(
            8,
            true,
            0,
            vec![
                batch(indirect(3, 0, 0, 1, 0, 7, 7), vec![3]),
                batch(indirect(5, 1, 0x4000, 2, 0, 7, 7), vec![5]),
                batch(indirect(1, 2, 0x8000, 2, 1, 7, 7), vec![1, 5]),
            ],
        ),
    ));
    // A PUT in odd pieces (header 5 + 19 + page, page split), and a GET
    // whose page and status share one descriptor.
    let mut odd = vec![
        header(0, 1, 0, 2, 9, 0),
        Cmd::Page {
            at: 24,
            content: Content::Half(1),
        },
    ];
    for (slot, (off, len, flags)) in [
        (0u32, 5u16, 0u16),
        (5, 30, 0),
        (35, 1000, 0),
        (1035, 3085, 0),
        (0x3000, 1, WRITE),
    ]
    .into_iter()
    .enumerate()
    {
        let next = if slot < 4 { NEXT } else { 0 };
        odd.push(Cmd::Desc {
            slot: slot as u8,
            desc: data_desc(off, len, flags | next, slot as u16 + 1),
        });
    }
    let merged = vec![
        header(0x5000, 2, 0, 2, 9, 0),
        Cmd::Desc {
            slot: 8,
            desc: data_desc(0x5000, 24, NEXT, 9),
        },
        Cmd::Desc {
            slot: 9,
            desc: data_desc(0x6000, 4097, WRITE, 0),
        },
    ];
    out.push((
        "split",
        device(16, false, 0, vec![batch(odd, vec![0]), batch(merged, vec![8])]),
    ));
    // Malformed, one way each: unknown op, short header, readable after
    // writable, a buffer off the end of memory, INDIRECT|NEXT, a loop, an
    // indirect table that is not whole descriptors, a head past the table.
    let mut bad = Vec::new();
    let mut unknown = direct(0, 0, 3, 0, 0, 0, Content::Zero);
    unknown[0] = header(0, 9, 0, 0, 0, 0);
    bad.push(batch(unknown, vec![0]));
    let mut short = direct(0, 0x100, 3, 0, 0, 0, Content::Zero);
    if let Cmd::Desc { desc, .. } = &mut short[1] {
        desc.len = LenSpec::Short(23);
    }
    bad.push(batch(short, vec![0]));
    bad.push(batch(
        vec![
            Cmd::Desc {
                slot: 4,
                desc: data_desc(0x300, 1, WRITE | NEXT, 5),
            },
            Cmd::Desc {
                slot: 5,
                desc: data_desc(0x200, 24, NEXT, 6),
            },
            Cmd::Desc {
                slot: 6,
                desc: data_desc(0x400, 1, WRITE, 0),
            },
        ],
        vec![4],
    ));
    let mut off_end = direct(0, 0x500, 3, 0, 0, 0, Content::Zero);
    if let Cmd::Desc { desc, .. } = &mut off_end[1] {
        desc.addr = AddrSpec::Data((dc::MEM_END - dc::DATA - 10) as u32);
    }
    bad.push(batch(off_end, vec![0]));
    let mut with_next = indirect(8, 2, 0x600, 3, 0, 1, 1);
    if let Some(Cmd::Desc { desc, .. }) = with_next.last_mut() {
        desc.flags |= NEXT;
    }
    bad.push(batch(with_next, vec![8]));
    bad.push(batch(
        vec![
            header(0x700, 3, 0, 0, 0, 0),
            Cmd::Desc {
                slot: 10,
                desc: data_desc(0x700, 24, NEXT, 11),
            },
            Cmd::Desc {
                slot: 11,
                desc: data_desc(0x800, 1, WRITE | NEXT, 11),
            },
        ],
        vec![10],
    ));
    let mut ragged = indirect(12, 3, 0x900, 3, 0, 0, 0);
    if let Some(Cmd::Desc { desc, .. }) = ragged.last_mut() {
        desc.len = LenSpec::Short(40);
    }
    bad.push(batch(ragged, vec![12]));
    // An indirect descriptor inside an indirect table.
    let mut nested = indirect(13, 0, 0xa00, 3, 0, 0, 0);
    nested.push(Cmd::IndirectDesc {
        table: 0,
        slot: 1,
        desc: DescSpec {
            addr: AddrSpec::Table(1),
            len: LenSpec::Entries(2),
            flags: INDIRECT | NEXT,
            next: 0,
        },
    });
    bad.push(batch(nested, vec![13]));
    bad.push(batch(vec![], vec![200]));
    out.push(("malformed", device(16, false, 0, bad)));
    // Under a tight budget: PUTs until they are REJECTED, each alone.
    let tight = (0..12u8)
        .map(|i| {
            batch(
                direct(0, u32::from(i) * 0x40, 1, 0, 0, i, Content::Random(i)),
                vec![0],
            )
        })
        .chain([batch(direct(4, 0x800, 5, 0, 0, 20, Content::Zero), vec![4])])
        .collect();
    out.push(("tight", device(4, true, 2, tight)));
    // A raw address and a 4 GiB chain.
    out.push((
        "raw",
        device(
            2,
            false,
            0,
            vec![batch(
                vec![
                    Cmd::Desc {
                        slot: 0,
                        desc: DescSpec {
                            addr: AddrSpec::Raw(u64::MAX - 3),
                            len: LenSpec::Raw(u32::MAX),
                            flags: NEXT,
                            next: 1,
                        },
                    },
                    Cmd::Desc {
                        slot: 1,
                        desc: data_desc(0, 24, WRITE, 0),
                    },
                ],
                vec![0, 1],
            )],
        ),
    ));
    out
}

fn store(setup: Setup, ops: Vec<Op>) -> Vec<u8> {
    so::Input { setup, ops }.to_bytes()
}

fn setup(dedup: DedupDomain, spill_limit: Option<u64>, mem_extra: Option<u64>) -> Setup {
    Setup {
        dedup,
        spill_limit,
        mem_extra,
        level: 1,
        shards: 0,
        headroom: 0,
    }
}

fn store_ops() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let mut ops = Vec::new();
    for i in 0..8 {
        ops.push(Op::Put((i % 3, 0, i), Content::Text(i)));
        ops.push(Op::Put((0, 1, i), Content::Text(i)));
        ops.push(Op::PutFill((1, 2, i), u64::from(i) * 0x0101));
    }
    ops.extend([
        Op::Get((0, 0, 0), false),
        Op::Get((0, 1, 3), true),
        Op::Invalidate((1, 0, 1)),
        Op::InvalidatePool(0, 1),
        Op::Get((1, 2, 5), false),
        Op::DropGuest(2),
        Op::Put((0, 0, 0), Content::Zero),
    ]);
    out.push(("roomy", store(setup(DedupDomain::Guest, None, None), ops)));

    let mut ops = Vec::new();
    for i in 0..16 {
        ops.push(Op::Put((0, 0, i), Content::Random(i)));
        ops.push(Op::Put((1, 1, i), Content::Half(i)));
    }
    ops.push(Op::Snapshot);
    for i in 0..8 {
        ops.push(Op::Put((0, 0, i), Content::Text(i)));
    }
    ops.extend([
        Op::Writeback(20),
        Op::Fault(Fault::Flip {
            at: 300,
            len: 100,
            xor: 0x20,
        }),
        Op::Fault(Fault::Zero { at: 9000, len: 200 }),
        Op::Fault(Fault::Copy {
            from: 0,
            to: 4096,
            len: 2048,
        }),
        Op::Fault(Fault::Rollback),
        Op::Fault(Fault::Truncate { to: 50_000 }),
    ]);
    for i in 0..16 {
        ops.push(Op::Get((0, 0, i), i % 4 == 0));
        ops.push(Op::Get((1, 1, i), false));
    }
    for i in 0..8 {
        ops.push(Op::Put((2, 2, i), Content::Random(i)));
    }
    out.push((
        "faults",
        store(setup(DedupDomain::Guest, Some(256 << 10), Some(16 << 10)), ops),
    ));

    let mut ops = vec![Op::FileSizeLimit(1)];
    for i in 0..16 {
        ops.push(Op::Put((0, i % 3, i), Content::Random(i)));
    }
    ops.extend([
        Op::Writeback(31),
        Op::FileSizeLimit(0),
        Op::Background,
        Op::SetMemLimit(0),
    ]);
    for i in 0..16 {
        ops.push(Op::Get((0, i % 3, i), false));
    }
    out.push((
        "fsize",
        store(
            Setup {
                headroom: 16 << 10,
                ..setup(DedupDomain::Off, Some(1 << 20), Some(24 << 10))
            },
            ops,
        ),
    ));

    let mut ops = Vec::new();
    for g in 0..3 {
        for i in 0..6 {
            ops.push(Op::Put((g, 0, i), Content::Random(i % 2)));
        }
    }
    ops.extend([Op::SetMemLimit(1), Op::DropGuest(1), Op::SetMemLimit(4)]);
    for i in 0..6 {
        ops.push(Op::Get((0, 0, i), true));
        ops.push(Op::Get((2, 0, i), false));
    }
    // Found by fuzzing: one object shard (see store/mod.rs,
    // one_object_shard_is_rounded_up_to_two).
    out.push((
        "regression-one-shard",
        store(
            Setup {
                shards: 1,
                ..setup(DedupDomain::Guest, None, None)
            },
            vec![Op::Put((0, 0, 0), Content::Random(1)), Op::Get((0, 0, 0), false)],
        ),
    ));
    out.push((
        "dedup-global",
        store(
            Setup {
                level: 3,
                shards: 1,
                ..setup(DedupDomain::Global, Some(16 << 10), Some(8 << 10))
            },
            ops,
        ),
    ));
    out
}

fn lines(text: &[&str]) -> Vec<u8> {
    text.join("\n").into_bytes()
}

fn control_line() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "commands",
            lines(&[
                r#"{"cmd":"stats"}"#,
                r#"{"cmd":"get-config"}"#,
                r#"{"cmd":"set-config","mem_limit":"48M"}"#,
                r#"{"cmd":"writeback","pages":4}"#,
                r#"{"cmd":"drop-pool","device":1,"pool":2}"#,
                r#"{"cmd":"stats"}"#,
            ]),
        ),
        (
            "limits",
            lines(&[
                r#"{"cmd":"set-config","mem_limit":0}"#,
                r#"{"cmd":"writeback","pages":18446744073709551615}"#,
                r#"{"cmd":"set-config","mem_limit":"16T"}"#,
                r#"{"cmd":"set-config","mem_limit":"1 GiB"}"#,
                r#"{"cmd":"set-config"}"#,
                r#"{"cmd":"drop-pool","device":7,"pool":0}"#,
            ]),
        ),
        (
            "malformed",
            lines(&[
                "",
                "   ",
                "[]",
                "\"stats\"",
                r#"{"cmd":1}"#,
                r#"{"pages":1}"#,
                r#"{"cmd":"nope"}"#,
                r#"{"cmd":"stats","extra":true}"#,
                r#"{"cmd":"writeback"}"#,
                r#"{"cmd":"writeback","pages":-1}"#,
                r#"{"cmd":"writeback","pages":1.5}"#,
                r#"{"cmd":"drop-pool","device":"0","pool":4294967296}"#,
                r#"{"cmd":"set-config","mem_limit":"12Q"}"#,
                r#"{"cmd":"set-config","mem_limit":null}"#,
                r#"{"cmd":"stats"}{"cmd":"stats"}"#,
                "{\"cmd\":\"st\u{e9}ts\"}",
            ]),
        ),
    ]
}

fn args(list: &[&str]) -> Vec<u8> {
    list.join("\0").into_bytes()
}

fn config_parse() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("minimal", args(&["--socket", "/run/vm0.sock"])),
        (
            "every-option",
            args(&[
                "--socket",
                "/run/vm0.sock",
                "--socket",
                "/run/vm1.sock",
                "--control",
                "/run/control.sock",
                "--mem-limit",
                "1G",
                "--spill-file",
                "/var/tmp",
                "--spill-limit",
                "8GiB",
                "--writeback-headroom",
                "auto",
                "--compression",
                "zstd:3",
                "--queues",
                "4",
                "--capacity",
                "2G",
                "--poll-us",
                "50",
                "--dedup",
                "global",
            ]),
        ),
        (
            "refused",
            args(&[
                "--socket",
                "/a",
                "--control",
                "/a",
                "--queues",
                "0",
                "--capacity",
                "4095",
                "--mem-limit",
                "16777216T",
            ]),
        ),
        ("size", b"512 KiB".to_vec()),
        ("json-size", b"\"4G\"".to_vec()),
    ]
}

/// Every seed: (target, name, bytes).
pub fn all() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for (target, seeds) in [
        ("device_chain", device_chain()),
        ("store_ops", store_ops()),
        ("control_line", control_line()),
        ("config_parse", config_parse()),
    ] {
        out.extend(seeds.into_iter().map(|(name, bytes)| (target, name, bytes)));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The seeds pass their own target, and the corpus in the repository is
    /// these seeds (`TMEM_WRITE_SEEDS=1` writes them).
    #[test]
    fn seed_corpus_is_current() {
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        let write = std::env::var_os("TMEM_WRITE_SEEDS").is_some();
        for (target, name, bytes) in all() {
            match target {
                "device_chain" => {
                    crate::device_chain::run(&bytes);
                }
                "store_ops" => {
                    crate::store_ops::run(&bytes);
                }
                "control_line" => crate::control_line::run(&bytes),
                _ => crate::config_parse::run(&bytes),
            }
            let file = match name.starts_with("regression-") {
                true => name.to_owned(),
                false => format!("seed-{name}"),
            };
            let path = corpus.join(target).join(file);
            if write {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            } else {
                let on_disk = std::fs::read(&path).unwrap_or_default();
                assert!(
                    on_disk == bytes,
                    "{} is not the seed built in seeds.rs; run the tests with TMEM_WRITE_SEEDS=1",
                    path.display()
                );
            }
        }
    }

    /// Every input kept in the corpus (seeds, finds, regressions) passes.
    #[test]
    fn corpus_replays() {
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        for (target, run) in [
            (
                "device_chain",
                (|d| {
                    crate::device_chain::run(d);
                }) as fn(&[u8]),
            ),
            ("store_ops", |d| {
                crate::store_ops::run(d);
            }),
            ("control_line", crate::control_line::run),
            ("config_parse", crate::config_parse::run),
        ] {
            let Ok(dir) = std::fs::read_dir(corpus.join(target)) else {
                continue;
            };
            for entry in dir {
                let path = entry.unwrap().path();
                let bytes = std::fs::read(&path).unwrap();
                let r = std::panic::catch_unwind(|| run(&bytes));
                assert!(r.is_ok(), "{} fails", path.display());
            }
        }
    }
}
