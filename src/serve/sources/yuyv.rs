//! PLACEHOLDER (being written): YUYV conversion.
