//! The error type of this crate and the [`Place`] an error points at.

use std::fmt;
use std::path::PathBuf;

use crate::registry::Role;

/// One step of a key path into a TOML document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A table key.
    Key(String),
    /// An index into an array (of tables).
    Index(usize),
}

/// Where in a model file something is: a key path (`layers[1].attention.submodules.linear_qkv`)
/// and, once the error has been located in its source text, a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Place {
    /// Key path from the document root.
    pub path: Vec<Segment>,
    /// 1-based line and column, when known.
    pub line_col: Option<(usize, usize)>,
}

impl Place {
    /// The document root.
    pub fn root() -> Self {
        Self::default()
    }

    /// This place extended by a table key.
    pub fn key(&self, key: &str) -> Self {
        let mut path = self.path.clone();
        path.push(Segment::Key(key.to_string()));
        Self { path, line_col: None }
    }

    /// This place extended by an array index.
    pub fn index(&self, index: usize) -> Self {
        let mut path = self.path.clone();
        path.push(Segment::Index(index));
        Self { path, line_col: None }
    }

    /// The key path alone, e.g. `layers[1].attention`.
    pub fn path_string(&self) -> String {
        let mut s = String::new();
        for seg in &self.path {
            match seg {
                Segment::Key(k) => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(k);
                }
                Segment::Index(i) => s.push_str(&format!("[{i}]")),
            }
        }
        s
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path_string();
        match (self.line_col, path.is_empty()) {
            (Some((l, c)), true) => write!(f, "line {l}, column {c}"),
            (Some((l, c)), false) => write!(f, "line {l}, column {c}, `{path}`"),
            (None, true) => write!(f, "document"),
            (None, false) => write!(f, "`{path}`"),
        }
    }
}

/// A list of names, printed comma-separated (known kinds, slots, presets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names(pub Vec<String>);

impl fmt::Display for Names {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return write!(f, "(none)");
        }
        write!(f, "{}", self.0.join(", "))
    }
}

/// Everything that can go wrong while reading a model file, resolving its specs against the
/// registry, and building modules from them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// The text is not valid TOML, or a value does not fit the schema (unknown key, wrong type).
    #[error("{place}: {message}")]
    Toml {
        /// Where.
        place: Place,
        /// The decoder's message.
        message: String,
    },
    /// A field without a default is absent.
    #[error("{place}: missing required field `{field}`")]
    MissingField {
        /// The table that lacks it.
        place: Place,
        /// The field's name.
        field: &'static str,
    },
    /// A field has a value outside its domain.
    #[error("{place}: invalid value {value} for `{field}`: {reason}")]
    InvalidValue {
        /// Where the field is.
        place: Place,
        /// The field's name.
        field: &'static str,
        /// The offending value, as written.
        value: String,
        /// What the value must satisfy.
        reason: String,
    },
    /// Values that are fine alone contradict each other (heads vs groups, GQA in cross
    /// attention, ...).
    #[error("{place}: {reason}")]
    Incompatible {
        /// Where the conflict shows.
        place: Place,
        /// What conflicts, with the values.
        reason: String,
    },
    /// A spec names a kind nobody registered.
    #[error("{place}: unknown module kind \"{kind}\", known: {known}")]
    UnknownKind {
        /// Where the kind is named.
        place: Place,
        /// The name as written.
        kind: String,
        /// Every registered kind.
        known: Names,
    },
    /// Two registrations claim one kind name (or alias).
    #[error("module kind \"{kind}\" registered twice: by {first} and by {second}")]
    DuplicateKind {
        /// The contested name.
        kind: String,
        /// Module path of the first registration.
        first: String,
        /// Module path of the second registration.
        second: String,
    },
    /// A slot holds a kind meant for another slot (e.g. a core attention in `linear_qkv`).
    #[error("{place}: slot `{slot}` takes a {expected}, but \"{kind}\" is a {got}")]
    WrongRole {
        /// Where the slot is.
        place: Place,
        /// The slot's name.
        slot: String,
        /// The kind in the slot.
        kind: String,
        /// The role the slot needs.
        expected: Role,
        /// The kind's role.
        got: Role,
    },
    /// A submodule slot the module does not have.
    #[error("{place}: {module} has no submodule slot `{slot}`; its slots: {known}")]
    UnknownSlot {
        /// Where the slot is written.
        place: Place,
        /// The module (kind) whose slots were given.
        module: String,
        /// The unknown slot.
        slot: String,
        /// The module's slots.
        known: Names,
    },
    /// A required submodule slot is empty.
    #[error("{place}: {module} needs its submodule slot `{slot}`")]
    MissingSlot {
        /// The spec that lacks it.
        place: Place,
        /// The module.
        module: String,
        /// The slot.
        slot: String,
    },
    /// An unknown spec preset.
    #[error("{place}: unknown preset \"{name}\", known: {known}")]
    UnknownPreset {
        /// Where.
        place: Place,
        /// As written.
        name: String,
        /// Known presets.
        known: Names,
    },
    /// A kind's own `params` table does not decode into its parameters.
    #[error("{place}: params of \"{kind}\": {message}")]
    Params {
        /// Where the params table is.
        place: Place,
        /// The kind.
        kind: String,
        /// What is wrong.
        message: String,
    },
    /// A valid request this implementation does not support (yet), e.g. a tensor-parallel
    /// build without a process group.
    #[error("{place}: not supported: {what}")]
    Unsupported {
        /// Where.
        place: Place,
        /// What, and why.
        what: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// libtorch refused to create a parameter.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl SpecError {
    /// The place this error points at, if any.
    pub fn place(&self) -> Option<&Place> {
        match self {
            Self::Toml { place, .. }
            | Self::MissingField { place, .. }
            | Self::InvalidValue { place, .. }
            | Self::Incompatible { place, .. }
            | Self::UnknownKind { place, .. }
            | Self::WrongRole { place, .. }
            | Self::UnknownSlot { place, .. }
            | Self::MissingSlot { place, .. }
            | Self::UnknownPreset { place, .. }
            | Self::Params { place, .. }
            | Self::Unsupported { place, .. } => Some(place),
            Self::DuplicateKind { .. } | Self::Io { .. } | Self::Torch(_) => None,
        }
    }

    fn place_mut(&mut self) -> Option<&mut Place> {
        match self {
            Self::Toml { place, .. }
            | Self::MissingField { place, .. }
            | Self::InvalidValue { place, .. }
            | Self::Incompatible { place, .. }
            | Self::UnknownKind { place, .. }
            | Self::WrongRole { place, .. }
            | Self::UnknownSlot { place, .. }
            | Self::MissingSlot { place, .. }
            | Self::UnknownPreset { place, .. }
            | Self::Params { place, .. }
            | Self::Unsupported { place, .. } => Some(place),
            Self::DuplicateKind { .. } | Self::Io { .. } | Self::Torch(_) => None,
        }
    }

    /// Fills in the line and column of this error's place from the source text it came from.
    /// The deepest part of the key path that exists in the text is used.
    pub fn locate(mut self, source: &str) -> Self {
        if let Some(place) = self.place_mut().filter(|p| p.line_col.is_none()) {
            place.line_col = crate::file::locate(source, &place.path);
        }
        self
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = SpecError> = std::result::Result<T, E>;
