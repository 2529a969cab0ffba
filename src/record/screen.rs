//! What `replay` and `watch` let through to an auditor's terminal.
//!
//! A recording holds whatever the target printed, and the target is as trusted as the
//! engineer on it. Most terminal sequences only draw on the screen and must pass, or
//! replays would look wrong: text, SGR colours, cursor movement, erasing, scroll
//! regions, the alternate screen, character sets. Some act *outside* the screen, on
//! the auditor's machine: OSC 52 writes the clipboard (`curl x|sh` waiting to be
//! pasted), OSC 0/1/2 set the window title, OSC 8 makes hyperlinks, and queries make
//! the terminal type an answer into the auditor's input. [`ScreenFilter`] drops those:
//!
//! - every OSC (`ESC ]`, clipboard, titles, hyperlinks, colour queries and settings),
//!   and every DCS, SOS, PM and APC string (`ESC P`, `ESC X`, `ESC ^`, `ESC _`:
//!   DECRQSS, XTGETTCAP, sixel and kitty graphics, tmux passthrough);
//! - queries answered into the input: DSR (`CSI … n`), DA1/DA2/DA3 (`CSI … c`),
//!   DECID (`ESC Z`), XTWINOPS (`CSI … t`, which also moves and resizes windows),
//!   DECREQTPARM (`CSI … x`), DECRQM (`CSI … $ p`), DECRQPSR/DECRQTSR (`$ w`, `$ u`),
//!   DECRQCRA (`* y`), DECRQDE (`" v`), XTVERSION (`CSI > … q`), XTQMODKEYS
//!   (`CSI ? … m`), XTSMGRAPHICS (`CSI ? … S`), kitty keyboard query (`CSI ? … u`),
//!   XTREPORTSGR (`# |`), locator reports (`' w`, `' z`, `' {`, `' |`), and ENQ
//!   (answerback);
//! - media copy (`CSI … i`, the printer) and 8-bit C1 controls (U+0080–U+009F, as
//!   UTF-8 or as stray bytes 0x80–0x9F), which some terminals read as CSI, OSC or
//!   DCS.
//!
//! The filter is a state machine fed chunk by chunk, so a sequence split across
//! chunks is handled exactly as a whole one, and it never holds more than
//! [`MAX_SEQUENCE`] bytes: the contents of dropped strings are not kept at all, and a
//! control sequence longer than that is dropped. Sequences it passes are passed only
//! once complete, so the auditor's terminal never sees the start of a dropped one.

/// Longest CSI or ESC sequence kept while waiting for its final byte; longer ones
/// are dropped whole (real ones are a few dozen bytes).
pub const MAX_SEQUENCE: usize = 256;

const ESC: u8 = 0x1b;
const BEL: u8 = 0x07;
const ENQ: u8 = 0x05;
const CAN: u8 = 0x18;
const SUB: u8 = 0x1a;
const DEL: u8 = 0x7f;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Text; `utf8` continuation bytes still expected for the current character.
    Ground { utf8: u8 },
    /// After 0xC2, held back: it may start a C1 control (U+0080–U+009F) in UTF-8.
    C2,
    /// After ESC.
    Escape,
    /// ESC and intermediate bytes (0x20–0x2F), waiting for a final byte.
    EscapeIntermediate,
    /// `ESC [` and parameter or intermediate bytes, waiting for a final byte.
    Csi,
    /// Inside an OSC, DCS, SOS, PM or APC string: dropped until BEL or ST.
    String,
    /// ESC inside such a string: `\` ends it (ST).
    StringEscape,
}

/// Drops the terminal sequences that act outside the screen; see the module doc.
#[derive(Debug, Clone)]
pub struct ScreenFilter {
    state: State,
    /// The pending CSI or ESC sequence, from its ESC.
    sequence: Vec<u8>,
    /// The pending sequence grew past [`MAX_SEQUENCE`]; it will be dropped.
    overflow: bool,
}

impl Default for ScreenFilter {
    fn default() -> ScreenFilter {
        ScreenFilter {
            state: State::Ground { utf8: 0 },
            sequence: Vec::new(),
            overflow: false,
        }
    }
}

impl ScreenFilter {
    pub fn new() -> ScreenFilter {
        ScreenFilter::default()
    }

    /// The part of `input` that may reach the auditor's terminal, given everything
    /// fed before it.
    pub fn filter(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len());
        for &byte in input {
            self.feed(byte, &mut out);
        }
        out
    }

    fn feed(&mut self, byte: u8, out: &mut Vec<u8>) {
        match self.state {
            State::Ground { utf8 } => self.ground(byte, utf8, out),
            State::C2 => {
                self.state = State::Ground { utf8: 0 };
                match byte {
                    0x80..=0x9f => {} // a C1 control, UTF-8 encoded: dropped with its lead
                    0xa0..=0xbf => out.extend_from_slice(&[0xc2, byte]),
                    _ => {
                        out.push(0xc2);
                        self.ground(byte, 0, out);
                    }
                }
            }
            State::Escape => self.escape(byte, out),
            State::EscapeIntermediate => self.escape_intermediate(byte, out),
            State::Csi => self.csi(byte, out),
            State::String => match byte {
                BEL | CAN | SUB => self.state = State::Ground { utf8: 0 },
                ESC => self.state = State::StringEscape,
                _ => {}
            },
            State::StringEscape => {
                if byte == b'\\' {
                    self.state = State::Ground { utf8: 0 };
                } else {
                    // ESC followed by anything else ends the string and starts a
                    // new sequence, as in xterm.
                    self.start_escape();
                    self.escape(byte, out);
                }
            }
        }
    }

    fn ground(&mut self, byte: u8, utf8: u8, out: &mut Vec<u8>) {
        if utf8 > 0 && (0x80..=0xbf).contains(&byte) {
            out.push(byte);
            self.state = State::Ground { utf8: utf8 - 1 };
            return;
        }
        self.state = State::Ground { utf8: 0 };
        match byte {
            ESC => self.start_escape(),
            ENQ => {}
            // 8-bit C1 controls (CSI, OSC, DCS… in one byte) outside a character.
            0x80..=0x9f => {}
            0xc2 => self.state = State::C2,
            0xc3..=0xdf => self.lead(byte, 1, out),
            0xe0..=0xef => self.lead(byte, 2, out),
            0xf0..=0xf4 => self.lead(byte, 3, out),
            _ => out.push(byte),
        }
    }

    fn lead(&mut self, byte: u8, continuation: u8, out: &mut Vec<u8>) {
        out.push(byte);
        self.state = State::Ground { utf8: continuation };
    }

    fn start_escape(&mut self) {
        self.state = State::Escape;
        self.sequence.clear();
        self.sequence.push(ESC);
        self.overflow = false;
    }

    /// A C0 control inside a pending sequence: terminals act on it at once and go
    /// on with the sequence. Returns whether `byte` was one.
    fn control_within(&mut self, byte: u8, out: &mut Vec<u8>) -> bool {
        match byte {
            ESC => self.start_escape(),
            CAN | SUB => self.state = State::Ground { utf8: 0 },
            ENQ => {}
            0x00..=0x1f => out.push(byte),
            DEL => {}
            _ => return false,
        }
        true
    }

    fn escape(&mut self, byte: u8, out: &mut Vec<u8>) {
        if self.control_within(byte, out) {
            return;
        }
        match byte {
            b'[' => {
                self.sequence.push(byte);
                self.state = State::Csi;
            }
            b']' | b'P' | b'X' | b'^' | b'_' => self.state = State::String,
            0x20..=0x2f => {
                self.sequence.push(byte);
                self.state = State::EscapeIntermediate;
            }
            // DECID: the terminal answers with its attributes.
            b'Z' => self.state = State::Ground { utf8: 0 },
            0x30..=0x7e => self.emit(byte, out),
            _ => self.abort(byte, out),
        }
    }

    fn escape_intermediate(&mut self, byte: u8, out: &mut Vec<u8>) {
        if self.control_within(byte, out) {
            return;
        }
        match byte {
            0x20..=0x2f => self.push(byte),
            0x30..=0x7e => self.emit(byte, out),
            _ => self.abort(byte, out),
        }
    }

    fn csi(&mut self, byte: u8, out: &mut Vec<u8>) {
        if self.control_within(byte, out) {
            return;
        }
        match byte {
            0x20..=0x3f => self.push(byte),
            0x40..=0x7e => {
                if acts_outside_the_screen(&self.sequence[2..], byte) {
                    self.state = State::Ground { utf8: 0 };
                } else {
                    self.emit(byte, out);
                }
            }
            _ => self.abort(byte, out),
        }
    }

    fn push(&mut self, byte: u8) {
        if self.sequence.len() < MAX_SEQUENCE {
            self.sequence.push(byte);
        } else {
            self.overflow = true;
        }
    }

    /// The pending sequence is complete with `last`: passed unless it overflowed.
    fn emit(&mut self, last: u8, out: &mut Vec<u8>) {
        if !self.overflow {
            out.extend_from_slice(&self.sequence);
            out.push(last);
        }
        self.state = State::Ground { utf8: 0 };
    }

    /// A byte that cannot continue the pending sequence: the sequence is dropped and
    /// the byte is read as text.
    fn abort(&mut self, byte: u8, out: &mut Vec<u8>) {
        self.state = State::Ground { utf8: 0 };
        self.ground(byte, 0, out);
    }
}

/// Whether the CSI sequence with these parameter and intermediate bytes and this
/// final byte makes the terminal answer into the input or act outside the screen.
fn acts_outside_the_screen(params: &[u8], last: u8) -> bool {
    let private = params.first().copied();
    let intermediate = params
        .iter()
        .rev()
        .find(|b| (0x20..=0x2f).contains(*b))
        .copied();
    match (intermediate, last) {
        // DSR, DA1/DA2/DA3, XTWINOPS, media copy.
        (_, b'n' | b'c' | b't' | b'i') => true,
        // DECREQTPARM (DECSACE is `* x`).
        (None, b'x') => true,
        (Some(b'$'), b'p' | b'w' | b'u') => true,
        (Some(b'*'), b'y') => true,
        (Some(b'"'), b'v') => true,
        (Some(b'#'), b'|') => true,
        (Some(b'\''), b'w' | b'z' | b'{' | b'|') => true,
        (None, b'q') => private == Some(b'>'),
        (None, b'm' | b'S' | b'u') => private == Some(b'?'),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filtered(input: &[u8]) -> Vec<u8> {
        ScreenFilter::new().filter(input)
    }

    /// Every way to cut `input` in two, and byte by byte, filters like the whole.
    fn same_when_split(input: &[u8]) -> Vec<u8> {
        let whole = filtered(input);
        for cut in 0..=input.len() {
            let mut filter = ScreenFilter::new();
            let mut out = filter.filter(&input[..cut]);
            out.extend(filter.filter(&input[cut..]));
            assert_eq!(out, whole, "cut at {cut} of {input:?}");
        }
        let mut filter = ScreenFilter::new();
        let bytewise: Vec<u8> = input.iter().flat_map(|b| filter.filter(&[*b])).collect();
        assert_eq!(bytewise, whole, "byte by byte: {input:?}");
        whole
    }

    #[test]
    fn screen_drawing_passes_unchanged() {
        let screen: &[&[u8]] = &[
            b"plain text\r\n",
            "ünïcödé 日本 🦀\n".as_bytes(),
            b"\x1b[1;31mred\x1b[0m \x1b[38;5;196mx\x1b[m",
            b"\x1b[2J\x1b[H\x1b[10;20H\x1b[K\x1b[2K\x1b[1A\x1b[3C",
            b"\x1b[?1049h\x1b[?25l\x1b[1;24r\x1b[?1049l\x1b[?25h",
            b"\x1b(B\x1b)0\x1b7\x1b8\x1b=\x1b>\x1bM\x1b#8\x1bc",
            b"\x1b[2 q\x1b[>1u\x1b[>4;1m\x08\x07\t",
        ];
        for input in screen {
            assert_eq!(same_when_split(input), input.to_vec(), "{input:?}");
        }
    }

    #[test]
    fn sequences_acting_outside_the_screen_are_dropped() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"a\x1b]52;c;Y3VybCB4fHNo\x07b", b"ab"),
            (b"a\x1b]52;c;Y3VybCB4fHNo\x1b\\b", b"ab"),
            (b"\x1b]0;title\x07\x1b]2;t\x1b\\x", b"x"),
            (b"\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\", b"link"),
            (b"\x1b]11;?\x07\x1b]4;1;?\x07z", b"z"),
            (b"\x1bP$qm\x1b\\\x1bP+q544e\x1b\\y", b"y"),
            (b"\x1b_Gi=1;AAAA\x1b\\\x1b^pm\x1b\\\x1bXsos\x1b\\w", b"w"),
            (b"\x1b[6n\x1b[5n\x1b[?6n\x1b[c\x1b[0c\x1b[>c\x1b[=c.", b"."),
            (b"\x1b[21t\x1b[18t\x1b[3;1;1t\x1b[?2026$p\x1b[4$p.", b"."),
            (b"\x1b[>q\x1b[?m\x1b[?u\x1b[1$w\x1b[1x\x1bZ\x05.", b"."),
            (b"\x1b[1;1;1;1*y\x1b[\"v\x1b[#|\x1b['|\x1b[5i.", b"."),
            // 8-bit C1 controls, raw or UTF-8 encoded; 0x9B inside a character is
            // part of that character.
            (b"\x9b6n\x9d52;c;x\x07", b"6n52;c;x\x07"),
            ("é\u{9b}[6n\u{a0}".as_bytes(), "é[6n\u{a0}".as_bytes()),
            ("\u{6db}".as_bytes(), "\u{6db}".as_bytes()),
            // An aborted string ends at CAN; ESC that does not start ST starts a
            // new sequence.
            (b"\x1b]0;t\x18after", b"after"),
            (b"\x1b]0;t\x1b[1mbold", b"\x1b[1mbold"),
        ];
        for (input, expected) in cases {
            assert_eq!(
                String::from_utf8_lossy(&same_when_split(input)),
                String::from_utf8_lossy(expected),
                "{input:?}"
            );
        }
    }

    #[test]
    fn memory_stays_bounded() {
        let mut filter = ScreenFilter::new();
        let mut input = b"\x1b[".to_vec();
        input.extend(std::iter::repeat_n(b'1', 100_000));
        input.extend(b"mvisible");
        assert_eq!(filter.filter(&input), b"visible");
        assert!(filter.sequence.capacity() <= 2 * MAX_SEQUENCE);
        let mut huge_osc = b"\x1b]52;c;".to_vec();
        huge_osc.extend(std::iter::repeat_n(b'A', 1 << 20));
        assert!(filter.filter(&huge_osc).is_empty());
        assert_eq!(filter.filter(b"\x07ok"), b"ok");
        assert!(filter.sequence.capacity() <= 2 * MAX_SEQUENCE);
    }

    proptest::proptest! {
        #[test]
        fn no_dropped_sequence_ever_gets_through(
            pieces in proptest::collection::vec(proptest::sample::select(vec![
                &b"\x1b"[..], b"]", b"[", b"52;c;", b"6n", b"P", b"\\", b"\x07", b"\x18",
                b"x", b"m", b"0", b";", b"?", b"\xc2", b"\xc3", b"\xa9", b"\x9b", b"\x9d",
            ]), 0..40),
            cut in 0usize..200,
        ) {
            let input: Vec<u8> = pieces.concat();
            let whole = filtered(&input);
            let cut = cut.min(input.len());
            let mut filter = ScreenFilter::new();
            let mut split = filter.filter(&input[..cut]);
            split.extend(filter.filter(&input[cut..]));
            proptest::prop_assert_eq!(&split, &whole);
            // What passes, read again, passes unchanged: nothing the filter would
            // drop can be assembled from what it let through. (A final 0xC2 is held
            // until the next byte, hence the period.)
            let ended = [whole.as_slice(), b"."].concat();
            proptest::prop_assert_eq!(filtered(&ended), ended);
            for needle in [&b"\x1b]"[..], b"\x1bP", b"\x1b[6n", b"\x05"] {
                proptest::prop_assert!(!whole.windows(needle.len()).any(|w| w == needle));
            }
        }
    }
}
