//! The rules (security, lights, notify, view) are not built yet: see the
//! project's issues. The library has the consumer runtime they will run on;
//! the binary refuses to pretend to work until they exist.

fn main() -> std::process::ExitCode {
    eprintln!(
        "{} {}: not implemented yet; the gateway (hearth-gateway) is the part that runs today",
        env!("CARGO_PKG_NAME"),
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::from(2)
}
