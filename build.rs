// The migrations are embedded by `sqlx::migrate!`; rebuild when they change
// (cargo does not see files a macro reads).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
