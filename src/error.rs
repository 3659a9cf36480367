//! What went wrong, for the exit status. Each module raises its own typed
//! errors where they start (`images::ImageError`, `seize::SeizeError`,
//! and `Refusal` for what crust declines to do); `anyhow` carries them up
//! with context, and `class_of` finds the first typed one in the chain:
//! the message is the whole chain on one line, the exit status its class.

/// The exit status of each class of failure (documented in the README and
/// `crust --help`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A failure of crust or of the system under it.
    Internal = 1,
    /// crust declines: an unsupported resource, bad input, a PID taken.
    Refused = 2,
    /// The images are corrupt, incomplete or of another format.
    Images = 3,
}

/// crust declines to go on; the message says what and what to do.
#[derive(Debug)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// A `Refusal` as an error value.
pub fn refused(msg: String) -> anyhow::Error {
    Refusal(msg).into()
}

/// Returns from the function with a `Refusal` built like `format!`.
#[macro_export]
macro_rules! refuse {
    ($($arg:tt)*) => {
        return Err($crate::error::Refusal(format!($($arg)*)).into())
    };
}

/// The class of the first typed error in `e`'s chain.
pub fn class_of(e: &anyhow::Error) -> Class {
    for cause in e.chain() {
        if cause.is::<Refusal>() {
            return Class::Refused;
        }
        if let Some(i) = cause.downcast_ref::<crate::images::ImageError>() {
            return i.class();
        }
        if let Some(s) = cause.downcast_ref::<crate::seize::SeizeError>() {
            return s.class();
        }
        if cause.is::<clap::Error>() {
            return Class::Refused;
        }
    }
    Class::Internal
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    fn refused() -> anyhow::Result<()> {
        refuse!("PID {} is busy", 7)
    }

    #[test]
    fn the_first_typed_error_decides() {
        let e = refused().context("dumping").unwrap_err();
        assert_eq!(class_of(&e), Class::Refused);
        assert_eq!(format!("{e:#}"), "dumping: PID 7 is busy");
        assert_eq!(class_of(&anyhow::anyhow!("plain")), Class::Internal);
    }
}
