//! Not built yet: see the project's issues. The binary exists so that the
//! workspace layout is in place; it refuses to pretend to work.

fn main() -> std::process::ExitCode {
    eprintln!(
        "{} {}: not implemented yet; the gateway (hearth-gateway) is the part that runs today",
        env!("CARGO_PKG_NAME"),
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::from(2)
}
