//! PLACEHOLDER (being written): byte streams split into frames.
