//! Crate-internal declaration macros.

/// Declares public constants one a line, each with its doc text:
/// `NAME: Type = value, "doc";`. For lists of documented values (register offsets, bits,
/// addresses, leaves) that read best as a table.
macro_rules! consts {
    ($($name:ident : $ty:ty = $value:expr, $doc:literal;)*) => {
        $(
            #[doc = $doc]
            pub const $name: $ty = $value;
        )*
    };
}
