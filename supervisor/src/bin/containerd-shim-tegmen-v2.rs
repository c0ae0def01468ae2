//! `containerd-shim-tegmen-v2`: Tegmen as containerd's runtime
//! `io.containerd.tegmen.v2`, one VM per pod (see `tegmen_supervisor::shim`).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    std::process::exit(tegmen_supervisor::shim::main(args));
}
