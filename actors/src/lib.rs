//! bangerd actors.
