//! CLIP text tokenizer: open_clip's `tokenize(text, context_length)`, in Rust.
//!
//! Two halves:
//!
//! 1. [`clean_text`] reproduces open_clip's clean-up (`_clean_lower`): `ftfy.fix_text`, then
//!    `html.unescape` twice, whitespace collapsed (Python's `str.split`), lower case.
//! 2. The byte-level BPE itself is the `tokenizers` crate reading the bundle's `tokenizer.json`
//!    (built by `onnx/build_tokenizer.py` from open_clip's own vocabulary and merges).
//!
//! The file's normalizer is switched off: [`clean_text`] already does everything it does, and
//! does it where open_clip does. open_clip applies NFC only inside ftfy, before its final
//! `html.unescape` rounds, so in `<b> e&#769;` the accent stays a separate code point; the
//! file's NFC would compose it and change the ids.
//! Its post-processor, truncation and padding are not used either: the start/end ids,
//! truncation and zero padding follow open_clip's rules exactly (see [`ClipTokenizer::encode`]).
//!
//! # ftfy coverage
//!
//! `ftfy.fix_text` (ftfy 6, default configuration) is reproduced for everything except
//! mojibake repair (`fix_encoding`: re-decoding text that went through the wrong codec, such as
//! `cafÃ©` → `café`), which rests on statistical heuristics and is out of scope: such text is
//! tokenized as written. Reproduced: ftfy's own HTML-entity step (only while no line so far
//! contains `<`), C1 controls read as Windows-1252, Latin ligatures (`ﬁ` → `fi`), character
//! width (full-width ASCII, ideographic space, half-width katakana per NFKC), curly quotes,
//! line breaks, ANSI terminal escapes, the control characters ftfy removes, and NFC — all
//! repeated until nothing changes, line by line, as ftfy does. Full NFKC is *not* applied
//! (`Ⅻ` stays as it is, as in open_clip).
//!
//! Known, deliberate differences: literal special-token text inside a prompt
//! (`<|endoftext|>` is the end id here, as in Hugging Face's CLIP tokenizer, while open_clip
//! 3.x spells its special tokens `<end_of_text>`), `'ſ` (open_clip's split regex ignores case,
//! so its `'s` also takes the long s), and ANSI escape parameters written with non-ASCII
//! digits.

use std::path::{Path, PathBuf};

use ndarray::Array2;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::Tokenizer;

/// Id of `<|startoftext|>`, first id of every sequence.
pub const START_OF_TEXT: i64 = 49406;
/// Id of `<|endoftext|>`, after the last text id; the largest id, so `argmax` finds it.
pub const END_OF_TEXT: i64 = 49407;

const START_OF_TEXT_TOKEN: &str = "<|startoftext|>";
const END_OF_TEXT_TOKEN: &str = "<|endoftext|>";

/// Why a tokenizer could not be loaded or a text tokenized.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// The tokenizer file is unreadable, invalid, or not a CLIP vocabulary.
    #[error("cannot load tokenizer {path}: {message}")]
    Load {
        /// The tokenizer file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The context length asked for is 0.
    #[error("context length must be at least 1, got {context_length}")]
    ContextLength {
        /// The length asked for.
        context_length: usize,
    },
    /// The BPE tokenizer failed on a text.
    #[error("cannot tokenize {text:?}: {message}")]
    Encode {
        /// The text.
        text: String,
        /// The tokenizer's message.
        message: String,
    },
}

/// open_clip-compatible CLIP tokenizer with a fixed context length.
pub struct ClipTokenizer {
    inner: Tokenizer,
    context_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer").field("context_length", &self.context_length).finish()
    }
}

impl ClipTokenizer {
    /// Load `tokenizer.json` and check that it is a CLIP vocabulary (special ids in place).
    pub fn from_file(path: &Path, context_length: usize) -> Result<Self, TokenizeError> {
        if context_length == 0 {
            return Err(TokenizeError::ContextLength { context_length });
        }
        let load_error = |message: String| TokenizeError::Load { path: path.to_path_buf(), message };
        let mut inner = Tokenizer::from_file(path).map_err(|e| load_error(e.to_string()))?;
        check_special_ids(&inner).map_err(load_error)?;
        // clean_text does the normalisation (see the module docs); special ids, truncation and
        // padding are applied by `fit_to_context`.
        inner.with_normalizer(None::<NormalizerWrapper>);
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| load_error(e.to_string()))?;
        Ok(Self { inner, context_length })
    }

    /// L: the number of ids every encoded text has.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Exactly open_clip's `tokenize(text, context_length)` ids for one text: length ==
    /// context_length. `[49406] + bpe + [49407]`; too long → the first `context_length` ids with
    /// the last one replaced by 49407; too short → zero padding.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizeError> {
        let bpe = self.bpe_ids(&clean_text(text)).map_err(|message| TokenizeError::Encode { text: text.to_string(), message })?;
        let mut ids = Vec::with_capacity(bpe.len() + 2);
        ids.push(START_OF_TEXT);
        ids.extend(bpe);
        ids.push(END_OF_TEXT);
        Ok(fit_to_context(ids, self.context_length))
    }

    /// Row-major `[texts.len(), context_length]` batch.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Array2<i64>, TokenizeError> {
        let mut batch = Array2::<i64>::zeros((texts.len(), self.context_length));
        for (mut row, text) in batch.rows_mut().into_iter().zip(texts) {
            for (slot, id) in row.iter_mut().zip(self.encode(text)?) {
                *slot = id;
            }
        }
        Ok(batch)
    }

    /// BPE ids of already-cleaned text, without start/end ids.
    fn bpe_ids(&self, cleaned: &str) -> Result<Vec<i64>, String> {
        let encoding = self.inner.encode_fast(cleaned, false).map_err(|e| e.to_string())?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }
}

/// A tokenizer whose special tokens sit elsewhere is not open_clip's vocabulary.
fn check_special_ids(tokenizer: &Tokenizer) -> Result<(), String> {
    for (token, expected) in [(START_OF_TEXT_TOKEN, START_OF_TEXT), (END_OF_TEXT_TOKEN, END_OF_TEXT)] {
        let found = tokenizer.token_to_id(token).map(i64::from);
        if found != Some(expected) {
            return Err(format!(
                "not a CLIP vocabulary: {token} has id {found:?}, expected {expected} \
                 (build it with onnx/build_tokenizer.py)"
            ));
        }
    }
    Ok(())
}

/// open_clip's truncation and padding of `[start] + bpe + [end]`.
fn fit_to_context(mut ids: Vec<i64>, context_length: usize) -> Vec<i64> {
    if ids.len() > context_length {
        ids.truncate(context_length);
        if let Some(last) = ids.last_mut() {
            *last = END_OF_TEXT;
        }
    } else {
        ids.resize(context_length, 0);
    }
    ids
}

/// open_clip's text clean-up done before BPE: `whitespace_clean(basic_clean(text)).lower()`,
/// where `basic_clean` = `ftfy.fix_text` (without mojibake repair), `html.unescape` twice.
pub fn clean_text(text: &str) -> String {
    let fixed = ftfy::fix_text(text);
    let unescaped = html::unescape(&html::unescape(&fixed));
    collapse_whitespace(&unescaped).to_lowercase()
}

/// `" ".join(text.split())`: Python's `str.split()` splits on `str.isspace()` characters,
/// which are Unicode White_Space plus the separators U+001C..U+001F.
fn collapse_whitespace(text: &str) -> String {
    let is_python_space = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    text.split(is_python_space).filter(|word| !word.is_empty()).collect::<Vec<_>>().join(" ")
}

/// The parts of `ftfy.fix_text` (ftfy 6.3, default configuration) other than mojibake repair.
mod ftfy {
    use unicode_normalization::UnicodeNormalization;

    /// ftfy's `max_decode_length`: segments are lines, but never longer than this many chars.
    const MAX_SEGMENT_CHARS: usize = 1_000_000;

    pub(super) fn fix_text(text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        // unescape_html="auto": ftfy stops decoding entities for good once a segment has a `<`
        // (it might be real HTML, whose entities a parser should handle).
        let mut unescape_entities = true;
        for segment in segments(text) {
            if segment.contains('<') {
                unescape_entities = false;
            }
            out.push_str(&fix_segment(segment, unescape_entities));
        }
        out
    }

    /// Lines (each with its `\n`), cut further at MAX_SEGMENT_CHARS, as ftfy does.
    fn segments(text: &str) -> Vec<&str> {
        let mut segments = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let line_end = rest.find('\n').map_or(rest.len(), |i| i + 1);
            let end = match rest[..line_end].char_indices().nth(MAX_SEGMENT_CHARS) {
                Some((byte_index, _)) => byte_index,
                None => line_end,
            };
            segments.push(&rest[..end]);
            rest = &rest[end..];
        }
        segments
    }

    /// ftfy's `fix_and_explain`: apply the fixers in order until the text stops changing.
    fn fix_segment(segment: &str, unescape_entities: bool) -> String {
        let mut text = segment.to_string();
        loop {
            let original = text.clone();
            if unescape_entities {
                text = super::html::ftfy_unescape(&text);
            }
            text = map_chars(&text, c1_control);
            text = map_chars(&text, latin_ligature);
            text = map_chars(&text, standard_width);
            text = map_chars(&text, uncurl_quote);
            text = fix_line_breaks(&text);
            text = remove_terminal_escapes(&text);
            text.retain(|c| !is_removed_control(c));
            text = text.nfc().collect();
            if text == original {
                return text;
            }
        }
    }

    /// Replace each char by `f(c)` when it returns a replacement, like `str.translate`.
    fn map_chars(text: &str, f: impl Fn(char) -> Option<String>) -> String {
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            match f(c) {
                Some(replacement) => out.push_str(&replacement),
                None => out.push(c),
            }
        }
        out
    }

    /// `fix_c1_controls`: U+0080..U+009F are read as the Windows-1252 bytes they usually were.
    fn c1_control(c: char) -> Option<String> {
        let code = u32::from(c);
        (0x80..=0x9f).contains(&code).then(|| super::html::windows_1252(code).to_string())
    }

    /// `fix_latin_ligatures`: typographic ligatures and legacy digraphs of Latin letters.
    fn latin_ligature(c: char) -> Option<String> {
        let expanded = match c {
            'Ĳ' => "IJ",
            'ĳ' => "ij",
            'ŉ' => "ʼn",
            'Ǳ' => "DZ",
            'ǲ' => "Dz",
            'ǳ' => "dz",
            'Ǆ' => "DŽ",
            'ǅ' => "Dž",
            'ǆ' => "dž",
            'Ǉ' => "LJ",
            'ǈ' => "Lj",
            'ǉ' => "lj",
            'Ǌ' => "NJ",
            'ǋ' => "Nj",
            'ǌ' => "nj",
            'ﬀ' => "ff",
            'ﬁ' => "fi",
            'ﬂ' => "fl",
            'ﬃ' => "ffi",
            'ﬄ' => "ffl",
            'ﬅ' => "ſt",
            'ﬆ' => "st",
            _ => return None,
        };
        Some(expanded.to_string())
    }

    /// `fix_character_width`: U+3000 becomes a space; the half-width and full-width forms
    /// block (U+FF01..U+FFEF) becomes its NFKC form, and nothing else is NFKC-mapped.
    fn standard_width(c: char) -> Option<String> {
        if c == '\u{3000}' {
            return Some(" ".to_string());
        }
        if !('\u{ff01}'..='\u{ffef}').contains(&c) {
            return None;
        }
        let nfkc: String = std::iter::once(c).nfkc().collect();
        (nfkc.chars().ne(std::iter::once(c))).then_some(nfkc)
    }

    /// `uncurl_quotes`.
    fn uncurl_quote(c: char) -> Option<String> {
        match c {
            '\u{2bc}' | '\u{2018}'..='\u{201b}' => Some("'".to_string()),
            '\u{201c}'..='\u{201f}' => Some("\"".to_string()),
            _ => None,
        }
    }

    /// `fix_line_breaks`: CRLF, CR, LS, PS and NEL all become `\n`.
    fn fix_line_breaks(text: &str) -> String {
        text.replace("\r\n", "\n").replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n")
    }

    /// `remove_terminal_escapes`: ANSI sequences `ESC [ (digit|;)* letter`.
    fn remove_terminal_escapes(text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("\u{1b}[") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let params = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit() || c == ';').len();
            match after[params..].chars().next() {
                Some(letter) if letter.is_ascii_alphabetic() => {
                    rest = &after[params + letter.len_utf8()..];
                }
                _ => {
                    out.push('\u{1b}');
                    rest = &rest[start + 1..];
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// `remove_control_chars`: controls ftfy deletes (tab, LF, FF and CR are kept).
    fn is_removed_control(c: char) -> bool {
        matches!(c,
            '\u{0}'..='\u{8}' | '\u{b}' | '\u{e}'..='\u{1f}' | '\u{7f}'
            | '\u{206a}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffc}')
    }
}

/// HTML character references, decoded the way Python's `html.unescape` and ftfy do.
///
/// Named references come from `html_escape`'s HTML5 table (the WHATWG list, as Python's
/// `html.entities.html5`), corrected for the entities whose value is two code points, which
/// that table cuts to the first one.
mod html {
    use std::collections::HashMap;
    use std::sync::OnceLock;

    /// Python's `html.unescape` (3.11).
    pub(super) fn unescape(text: &str) -> String {
        replace_references(text, python_reference)
    }

    /// ftfy's `unescape_html`: only complete `&name;` / `&#…;` references of at most 24
    /// alphanumerics; also decodes upper-cased names such as `&NTILDE;`.
    pub(super) fn ftfy_unescape(text: &str) -> String {
        replace_references(text, ftfy_reference)
    }

    /// Scan for `&`, let `reference` decode what follows it: `(bytes consumed after the '&',
    /// replacement)`, or `None` to keep the `&` as text.
    fn replace_references(text: &str, reference: fn(&str) -> Option<(usize, String)>) -> String {
        if !text.contains('&') {
            return text.to_string();
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(amp) = rest.find('&') {
            out.push_str(&rest[..amp]);
            let after = &rest[amp + 1..];
            match reference(after) {
                Some((consumed, replacement)) => {
                    out.push_str(&replacement);
                    rest = &after[consumed..];
                }
                None => {
                    out.push('&');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// Length in bytes of the longest prefix of at most `max_chars` chars satisfying `accept`.
    fn prefix_len(text: &str, max_chars: usize, accept: impl Fn(char) -> bool) -> usize {
        text.char_indices().take(max_chars).take_while(|&(_, c)| accept(c)).last().map_or(0, |(i, c)| i + c.len_utf8())
    }

    /// One match of Python's `&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)`.
    fn python_reference(after: &str) -> Option<(usize, String)> {
        let semicolon = |text: &str, at: usize| usize::from(text[at..].starts_with(';'));
        if let Some(number) = after.strip_prefix('#') {
            let (radix, digits_from) = match number.chars().next() {
                Some('x' | 'X') => (16, 1),
                _ => (10, 0),
            };
            let digits = &number[digits_from..];
            let len = prefix_len(digits, usize::MAX, |c| c.is_digit(radix));
            if len == 0 {
                return None;
            }
            let value = u32::from_str_radix(&digits[..len], radix).ok();
            let consumed = 1 + digits_from + len + semicolon(digits, len);
            return Some((consumed, numeric_reference(value)));
        }
        let len = prefix_len(after, 32, |c| !matches!(c, '\t' | '\n' | '\u{c}' | ' ' | '<' | '&' | '#' | ';'));
        if len == 0 {
            return None;
        }
        let consumed = len + semicolon(after, len);
        Some((consumed, named_reference(&after[..consumed])))
    }

    /// Python's numeric rules; `None` = too large to parse (Python: > 0x10FFFF → U+FFFD).
    fn numeric_reference(value: Option<u32>) -> String {
        let Some(code) = value else {
            return '\u{fffd}'.to_string();
        };
        match code {
            0x00 => '\u{fffd}'.to_string(),
            0x0d => '\r'.to_string(),
            0x80..=0x9f => windows_1252(code).to_string(),
            0xd800..=0xdfff | 0x11_0000.. => '\u{fffd}'.to_string(),
            _ if is_invalid_codepoint(code) => String::new(),
            _ => char::from_u32(code).map_or_else(String::new, String::from),
        }
    }

    /// Python's `_invalid_codepoints`: C0/C1 controls, noncharacters (reference dropped).
    fn is_invalid_codepoint(code: u32) -> bool {
        matches!(code, 0x01..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f..=0x9f | 0xfdd0..=0xfdef) || (code & 0xfffe) == 0xfffe
    }

    /// `s` = name with its `;` if present. Exact name, else the longest legacy name (those
    /// valid without `;`) that is a proper prefix of at least 2 chars, else left as is.
    fn named_reference(s: &str) -> String {
        let exact = match s.strip_suffix(';') {
            Some(name) => entity(name),
            None => legacy_entity(s),
        };
        if let Some(value) = exact {
            return value.to_string();
        }
        let boundaries: Vec<usize> = s.char_indices().map(|(i, _)| i).skip(2).collect();
        for &end in boundaries.iter().rev() {
            if let Some(value) = legacy_entity(&s[..end]) {
                return format!("{value}{}", &s[end..]);
            }
        }
        format!("&{s}")
    }

    /// One match of ftfy's `&#?[0-9A-Za-z]{1,24};`, decoded as `_unescape_fixup` does.
    fn ftfy_reference(after: &str) -> Option<(usize, String)> {
        let hash = usize::from(after.starts_with('#'));
        let body = &after[hash..];
        let len = prefix_len(body, 25, |c| c.is_ascii_alphanumeric());
        if len == 0 || len > 24 || !body[len..].starts_with(';') {
            return None;
        }
        let consumed = hash + len + 1;
        let reference = format!("&{}", &after[..consumed]);
        let replacement = if hash == 1 {
            // Numeric: Python's decoding, unless it did not consume the whole reference.
            let decoded = unescape(&reference);
            if decoded.contains(';') {
                reference
            } else {
                decoded
            }
        } else {
            let name = &body[..len];
            match entity(name) {
                Some(value) => value.to_string(),
                None => upper_case_entities().get(name).cloned().unwrap_or(reference),
            }
        };
        Some((consumed, replacement))
    }

    /// ftfy also decodes entity names written in upper case (`&EACUTE;` → `É`) when the
    /// lower-case name is an entity and the upper-case spelling means nothing to Python.
    fn upper_case_entities() -> &'static HashMap<String, String> {
        static TABLE: OnceLock<HashMap<String, String>> = OnceLock::new();
        TABLE.get_or_init(|| {
            let mut table = HashMap::new();
            for (name, _) in html_escape::NAMED_ENTITIES.iter() {
                let Ok(name) = std::str::from_utf8(name) else {
                    continue;
                };
                if name.bytes().any(|b| b.is_ascii_uppercase()) {
                    continue;
                }
                let upper = name.to_ascii_uppercase();
                let reference = format!("&{upper};");
                if let Some(value) = entity(name) {
                    if unescape(&reference) == reference {
                        table.insert(upper, value.to_uppercase());
                    }
                }
            }
            table
        })
    }

    /// Value of the HTML5 entity `&name;`.
    fn entity(name: &str) -> Option<&'static str> {
        if let Ok(i) = MULTI_CODE_POINT_ENTITIES.binary_search_by(|(n, _)| (*n).cmp(name)) {
            return Some(MULTI_CODE_POINT_ENTITIES[i].1);
        }
        let table = &html_escape::NAMED_ENTITIES;
        let i = table.binary_search_by(|(n, _)| (*n).cmp(name.as_bytes())).ok()?;
        Some(table[i].1)
    }

    /// Value of a legacy entity written without `;` (`&amp`, `&eacute`).
    fn legacy_entity(name: &str) -> Option<&'static str> {
        LEGACY_ENTITY_NAMES.binary_search(&name).ok().and_then(|_| entity(name))
    }

    /// Windows-1252 reading of the byte 0x80..=0x9F (undefined bytes keep their code point),
    /// used both by Python's numeric references and by ftfy's `fix_c1_controls`.
    pub(super) fn windows_1252(code: u32) -> char {
        const TABLE: [char; 32] = [
            '\u{20ac}', '\u{81}', '\u{201a}', '\u{192}', '\u{201e}', '\u{2026}', '\u{2020}', '\u{2021}', '\u{2c6}', '\u{2030}',
            '\u{160}', '\u{2039}', '\u{152}', '\u{8d}', '\u{17d}', '\u{8f}', '\u{90}', '\u{2018}', '\u{2019}', '\u{201c}',
            '\u{201d}', '\u{2022}', '\u{2013}', '\u{2014}', '\u{2dc}', '\u{2122}', '\u{161}', '\u{203a}', '\u{153}', '\u{9d}',
            '\u{17e}', '\u{178}',
        ];
        code.checked_sub(0x80).and_then(|i| TABLE.get(i as usize).copied()).or_else(|| char::from_u32(code)).unwrap_or('\u{fffd}')
    }

    #[cfg(test)]
    #[test]
    fn tables_are_sorted_for_binary_search() {
        assert!(LEGACY_ENTITY_NAMES.windows(2).all(|w| w[0] < w[1]));
        assert!(MULTI_CODE_POINT_ENTITIES.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(html_escape::NAMED_ENTITIES.windows(2).all(|w| w[0].0 < w[1].0));
    }

    /// Entities valid without the `;` (Python's `html5` keys without `;`), sorted.
    const LEGACY_ENTITY_NAMES: [&str; 106] = [
        "AElig", "AMP", "Aacute", "Acirc", "Agrave", "Aring", "Atilde", "Auml", "COPY", "Ccedil", "ETH", "Eacute", "Ecirc",
        "Egrave", "Euml", "GT", "Iacute", "Icirc", "Igrave", "Iuml", "LT", "Ntilde", "Oacute", "Ocirc", "Ograve", "Oslash",
        "Otilde", "Ouml", "QUOT", "REG", "THORN", "Uacute", "Ucirc", "Ugrave", "Uuml", "Yacute", "aacute", "acirc", "acute",
        "aelig", "agrave", "amp", "aring", "atilde", "auml", "brvbar", "ccedil", "cedil", "cent", "copy", "curren", "deg",
        "divide", "eacute", "ecirc", "egrave", "eth", "euml", "frac12", "frac14", "frac34", "gt", "iacute", "icirc", "iexcl",
        "igrave", "iquest", "iuml", "laquo", "lt", "macr", "micro", "middot", "nbsp", "not", "ntilde", "oacute", "ocirc",
        "ograve", "ordf", "ordm", "oslash", "otilde", "ouml", "para", "plusmn", "pound", "quot", "raquo", "reg", "sect", "shy",
        "sup1", "sup2", "sup3", "szlig", "thorn", "times", "uacute", "ucirc", "ugrave", "uml", "uuml", "yacute", "yen", "yuml",
    ];

    /// HTML5 entities whose value is two code points (Python's `html5`), sorted by name.
    const MULTI_CODE_POINT_ENTITIES: [(&str, &str); 93] = [
        ("NotEqualTilde", "\u{2242}\u{338}"),
        ("NotGreaterFullEqual", "\u{2267}\u{338}"),
        ("NotGreaterGreater", "\u{226B}\u{338}"),
        ("NotGreaterSlantEqual", "\u{2A7E}\u{338}"),
        ("NotHumpDownHump", "\u{224E}\u{338}"),
        ("NotHumpEqual", "\u{224F}\u{338}"),
        ("NotLeftTriangleBar", "\u{29CF}\u{338}"),
        ("NotLessLess", "\u{226A}\u{338}"),
        ("NotLessSlantEqual", "\u{2A7D}\u{338}"),
        ("NotNestedGreaterGreater", "\u{2AA2}\u{338}"),
        ("NotNestedLessLess", "\u{2AA1}\u{338}"),
        ("NotPrecedesEqual", "\u{2AAF}\u{338}"),
        ("NotRightTriangleBar", "\u{29D0}\u{338}"),
        ("NotSquareSubset", "\u{228F}\u{338}"),
        ("NotSquareSuperset", "\u{2290}\u{338}"),
        ("NotSubset", "\u{2282}\u{20D2}"),
        ("NotSucceedsEqual", "\u{2AB0}\u{338}"),
        ("NotSucceedsTilde", "\u{227F}\u{338}"),
        ("NotSuperset", "\u{2283}\u{20D2}"),
        ("ThickSpace", "\u{205F}\u{200A}"),
        ("acE", "\u{223E}\u{333}"),
        ("bne", "\u{3D}\u{20E5}"),
        ("bnequiv", "\u{2261}\u{20E5}"),
        ("caps", "\u{2229}\u{FE00}"),
        ("cups", "\u{222A}\u{FE00}"),
        ("fjlig", "\u{66}\u{6A}"),
        ("gesl", "\u{22DB}\u{FE00}"),
        ("gvertneqq", "\u{2269}\u{FE00}"),
        ("gvnE", "\u{2269}\u{FE00}"),
        ("lates", "\u{2AAD}\u{FE00}"),
        ("lesg", "\u{22DA}\u{FE00}"),
        ("lvertneqq", "\u{2268}\u{FE00}"),
        ("lvnE", "\u{2268}\u{FE00}"),
        ("nGg", "\u{22D9}\u{338}"),
        ("nGt", "\u{226B}\u{20D2}"),
        ("nGtv", "\u{226B}\u{338}"),
        ("nLl", "\u{22D8}\u{338}"),
        ("nLt", "\u{226A}\u{20D2}"),
        ("nLtv", "\u{226A}\u{338}"),
        ("nang", "\u{2220}\u{20D2}"),
        ("napE", "\u{2A70}\u{338}"),
        ("napid", "\u{224B}\u{338}"),
        ("nbump", "\u{224E}\u{338}"),
        ("nbumpe", "\u{224F}\u{338}"),
        ("ncongdot", "\u{2A6D}\u{338}"),
        ("nedot", "\u{2250}\u{338}"),
        ("nesim", "\u{2242}\u{338}"),
        ("ngE", "\u{2267}\u{338}"),
        ("ngeqq", "\u{2267}\u{338}"),
        ("ngeqslant", "\u{2A7E}\u{338}"),
        ("nges", "\u{2A7E}\u{338}"),
        ("nlE", "\u{2266}\u{338}"),
        ("nleqq", "\u{2266}\u{338}"),
        ("nleqslant", "\u{2A7D}\u{338}"),
        ("nles", "\u{2A7D}\u{338}"),
        ("notinE", "\u{22F9}\u{338}"),
        ("notindot", "\u{22F5}\u{338}"),
        ("nparsl", "\u{2AFD}\u{20E5}"),
        ("npart", "\u{2202}\u{338}"),
        ("npre", "\u{2AAF}\u{338}"),
        ("npreceq", "\u{2AAF}\u{338}"),
        ("nrarrc", "\u{2933}\u{338}"),
        ("nrarrw", "\u{219D}\u{338}"),
        ("nsce", "\u{2AB0}\u{338}"),
        ("nsubE", "\u{2AC5}\u{338}"),
        ("nsubset", "\u{2282}\u{20D2}"),
        ("nsubseteqq", "\u{2AC5}\u{338}"),
        ("nsucceq", "\u{2AB0}\u{338}"),
        ("nsupE", "\u{2AC6}\u{338}"),
        ("nsupset", "\u{2283}\u{20D2}"),
        ("nsupseteqq", "\u{2AC6}\u{338}"),
        ("nvap", "\u{224D}\u{20D2}"),
        ("nvge", "\u{2265}\u{20D2}"),
        ("nvgt", "\u{3E}\u{20D2}"),
        ("nvle", "\u{2264}\u{20D2}"),
        ("nvlt", "\u{3C}\u{20D2}"),
        ("nvltrie", "\u{22B4}\u{20D2}"),
        ("nvrtrie", "\u{22B5}\u{20D2}"),
        ("nvsim", "\u{223C}\u{20D2}"),
        ("race", "\u{223D}\u{331}"),
        ("smtes", "\u{2AAC}\u{FE00}"),
        ("sqcaps", "\u{2293}\u{FE00}"),
        ("sqcups", "\u{2294}\u{FE00}"),
        ("varsubsetneq", "\u{228A}\u{FE00}"),
        ("varsubsetneqq", "\u{2ACB}\u{FE00}"),
        ("varsupsetneq", "\u{228B}\u{FE00}"),
        ("varsupsetneqq", "\u{2ACC}\u{FE00}"),
        ("vnsub", "\u{2282}\u{20D2}"),
        ("vnsup", "\u{2283}\u{20D2}"),
        ("vsubnE", "\u{2ACB}\u{FE00}"),
        ("vsubne", "\u{228A}\u{FE00}"),
        ("vsupnE", "\u{2ACC}\u{FE00}"),
        ("vsupne", "\u{228B}\u{FE00}"),
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ligatures_width_and_quotes() {
        assert_eq!(clean_text("ﬁsh ﬂower ｏｆｆｉｃｅ"), "fish flower office");
        assert_eq!(clean_text("ＬＯＵＤ\u{3000}ＮＯＩＳＥＳ"), "loud noises");
        assert_eq!(clean_text("\u{201c}it\u{2019}s\u{201d}"), "\"it's\"");
        assert_eq!(clean_text("ｶﾞｷﾞ"), "ガギ");
        // Full NFKC is not applied.
        assert_eq!(clean_text("Ⅻ ①"), "ⅻ ①");
    }

    #[test]
    fn whitespace_and_controls() {
        assert_eq!(clean_text("  a\tphoto\r\n of\u{a0}a  cat.  "), "a photo of a cat.");
        assert_eq!(clean_text("a\u{1c}b\u{0}c\u{feff}d"), "abcd");
        assert_eq!(clean_text("\u{1b}[31mred\u{1b}[0m"), "red");
        assert_eq!(clean_text(" \t\n "), "");
        assert_eq!(clean_text(""), "");
    }

    #[test]
    fn html_entities() {
        assert_eq!(clean_text("Tom &amp; Jerry"), "tom & jerry");
        assert_eq!(clean_text("&lt;b&gt; &#39;x&#39; &quot;y&quot;"), "<b> 'x' \"y\"");
        // ftfy unescapes repeatedly, then open_clip twice more.
        assert_eq!(clean_text("a &amp;amp;amp;amp; b"), "a & b");
        // With a `<` in the line ftfy leaves entities alone: only open_clip's two rounds.
        assert_eq!(clean_text("< &amp;amp;amp;amp;"), "< &amp;amp;");
        // Python accepts legacy names without `;` and numeric references without `;`.
        assert_eq!(clean_text("caf&eacute &ampx &#65B &#x42;"), "café &x ab b");
        assert_eq!(clean_text("&NTILDE; &notanentity;"), "ñ ¬anentity;");
        // ftfy's NFC composes what its own unescaping produced; open_clip's later rounds
        // (here the only ones, because of the `<`) are not normalised.
        assert_eq!(clean_text("e&#769;"), "é");
        assert_eq!(clean_text("<b> e&#769;"), "<b> e\u{301}");
        assert_eq!(clean_text("x\u{a0}&nbsp;y a&#x2028;b"), "x y a b");
        assert_eq!(clean_text("&#150; &#0; &#1;"), "\u{2013} \u{fffd}");
        assert_eq!(clean_text("&acE;"), "\u{223e}\u{333}");
    }

    #[test]
    fn lowercase_like_python() {
        assert_eq!(clean_text("ΟΔΟΣ Zürich İ"), "\u{3bf}\u{3b4}\u{3bf}\u{3c2} zürich i\u{307}");
        // C1 controls read as Windows-1252, then uncurled.
        assert_eq!(clean_text("\u{93}hi\u{94} caf\u{82}"), "\"hi\" caf'");
    }

    #[test]
    fn truncation_and_padding() {
        assert_eq!(fit_to_context(vec![START_OF_TEXT, 1, 2, END_OF_TEXT], 6), [START_OF_TEXT, 1, 2, END_OF_TEXT, 0, 0]);
        assert_eq!(fit_to_context(vec![START_OF_TEXT, 1, 2, END_OF_TEXT], 4), [START_OF_TEXT, 1, 2, END_OF_TEXT]);
        assert_eq!(fit_to_context(vec![START_OF_TEXT, 1, 2, 3, END_OF_TEXT], 3), [START_OF_TEXT, 1, END_OF_TEXT]);
        assert_eq!(fit_to_context(vec![START_OF_TEXT, END_OF_TEXT], 1), [END_OF_TEXT]);
    }

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ClipTokenizer>();
    }
}
