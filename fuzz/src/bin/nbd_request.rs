//! NBD transmission request header and option payload parsers.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = tandem_nbd::wire::parse_request(data);
        let _ = tandem_nbd::wire::parse_meta_context_option(data);
        let _ = tandem_nbd::wire::parse_info_option(data);
    });
}
