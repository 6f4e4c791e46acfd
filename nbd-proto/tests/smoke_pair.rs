mod support;
use nbd_proto::*;
use support::pair::Pair;
use support::server::Behaviour;

#[test]
fn nbdkit_like_read_write() {
    let mut cfg = Config::default();
    cfg.add_meta_context("base:allocation").unwrap();
    let mut p = Pair::connect(cfg, Behaviour::nbdkit(), 1 << 20);
    assert_eq!(p.state(), PublicState::Ready);
    let w = p.client.write(4096, vec![7; 8192], CmdFlags::FUA).unwrap();
    let r = p.client.read(0, vec![1; 16384], CmdFlags::empty()).unwrap();
    p.drive();
    p.completed(w).unwrap();
    let buf = p.completed(r).unwrap().unwrap();
    assert_eq!(&buf[..4096], &[0; 4096][..]);
    assert_eq!(&buf[4096..12288], &[7; 8192][..]);
}
