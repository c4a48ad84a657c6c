use petrel_runtime::gguf::GgufFile;
use petrel_runtime::mapped::MappedFile;
use petrel_runtime::sampler::argmax;
use petrel_runtime::{Model, Session, SessionOptions};
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let file = MappedFile::open(&args[1]).unwrap();
    let gguf = GgufFile::parse(file.bytes()).unwrap();
    let model = match Model::load(&gguf) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("load error: {e}");
            return;
        }
    };
    eprintln!("{:?}", model.config.block);
    let mut tokens = Vec::new();
    if model.tokenizer.add_bos() {
        tokens.push(model.tokenizer.bos());
    }
    tokens.extend(model.tokenizer.encode(&args[2], true));
    eprintln!("tokens {:?}", tokens);
    let mut s =
        Session::new(&model, SessionOptions { capacity: 256, threads: 2, ..SessionOptions::default() }).unwrap();
    let t0 = std::time::Instant::now();
    let mut next = argmax(s.prefill(&tokens).unwrap());
    let mut out = vec![];
    for _ in 0..24 {
        out.push(next);
        if model.tokenizer.is_end_of_generation(next) {
            break;
        }
        next = argmax(s.step(next).unwrap());
    }
    eprintln!("{:?} in {:?}", model.tokenizer.decode(&out), t0.elapsed());
}
