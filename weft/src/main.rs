use clap::Parser;

fn main() -> anyhow::Result<()> {
    weft::run(weft::Cli::parse())
}
