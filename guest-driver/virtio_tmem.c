// SPDX-License-Identifier: GPL-2.0
/*
 * virtio_tmem: a synchronous swap block device backed by host memory.
 *
 * Each virtio device with ID 63 becomes one block device /dev/tmemN. A write
 * of a 4 KiB page is a PUT (or PUT_FILL when every 64-bit word of the page is
 * the same), a read is a GET, discard/write-zeroes and the swap layer's
 * slot-free notification are INVALIDATE_PAGE. Every request is synchronous:
 * the submitter polls the used ring for a short while and then sleeps until
 * the interrupt. The wire format is described in docs/protocol.md.
 *
 * Locking: each queue has one spinlock covering virtqueue_add_sgs, kick
 * preparation, virtqueue_get_buf and the interrupt callback, and one request
 * slot (preallocated header and status buffers) that a submitter claims
 * before it posts. At most one request per queue is in flight.
 */

#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/blkdev.h>
#include <linux/bio.h>
#include <linux/highmem.h>
#include <linux/pagemap.h>
#include <linux/scatterlist.h>
#include <linux/completion.h>
#include <linux/wait.h>
#include <linux/workqueue.h>
#include <linux/idr.h>
#include <linux/bitmap.h>
#include <linux/slab.h>
#include <linux/mm.h>
#include <linux/ktime.h>

#include "virtio_tmem.h"
#include "compat.h"

/* A status byte the device has not written (it never sends this value). */
#define TMEM_S_NONE		0xff

static unsigned int poll_us = 50;
module_param(poll_us, uint, 0644);
MODULE_PARM_DESC(poll_us, "Busy-poll the used ring this long before sleeping (us)");

static unsigned int notify_spin_us = 2000;
module_param(notify_spin_us, uint, 0644);
MODULE_PARM_DESC(notify_spin_us, "Slot-free invalidations spin this long before completing asynchronously (us)");

static unsigned int io_timeout_ms = 30000;
module_param(io_timeout_ms, uint, 0644);
MODULE_PARM_DESC(io_timeout_ms, "A request unanswered this long marks the device broken (ms)");

static unsigned long capacity_mb;
module_param(capacity_mb, ulong, 0444);
MODULE_PARM_DESC(capacity_mb, "Swap device size in MiB (0: from the device, else twice the RAM)");

static unsigned int max_queues;
module_param(max_queues, uint, 0444);
MODULE_PARM_DESC(max_queues, "Use at most this many virtqueues (0: one per CPU)");

static unsigned int pool;
module_param(pool, uint, 0444);
MODULE_PARM_DESC(pool, "Pool id used in every request");

static char *backing_dev;
module_param(backing_dev, charp, 0444);
MODULE_PARM_DESC(backing_dev, "Block device for pages the host rejects (tmem0 only)");

struct tmem_dma {
	struct virtio_tmem_req req;
	u8 status;
};

struct tmem_dev;

struct tmem_queue {
	spinlock_t lock;	/* add_sgs, kick, get_buf, callback, flags */
	struct virtqueue *vq;
	struct tmem_dev *dev;
	struct tmem_dma *dma;	/* header and status of the slot's request */
	bool busy;		/* slot claimed */
	bool done;		/* posted request came back */
	bool sleeping;		/* submitter waits for the interrupt */
	bool async;		/* timed-out free notify; the reaper releases */
	u32 used_len;
	struct completion compl;
	wait_queue_head_t slot_wq;
	char name[16];
};

struct tmem_stats {
	atomic64_t stores;
	atomic64_t fills;
	atomic64_t loads;
	atomic64_t rejects;
	atomic64_t invalidates;
	atomic64_t not_found;
	atomic64_t errors;
	atomic64_t notify_misses;
	atomic64_t backing_writes;
	atomic64_t backing_reads;
};

struct tmem_dev {
	struct virtio_device *vdev;
	struct gendisk *disk;
	int id;
	unsigned int nq;
	struct tmem_queue *queues;
	u64 capacity;		/* pages */
	u32 caps;
	bool broken;		/* set under every queue lock */
	unsigned long *in_host;		/* slot has a copy in the host */
	unsigned long *in_backing;	/* slot lives on backing_dev */
	unsigned long *inval_pending;	/* missed free notifies */
	atomic_t inval_count;
	atomic_t async_inflight;
	wait_queue_head_t async_wq;
	struct mutex inval_mutex;	/* orders pending invalidations vs PUT */
	struct workqueue_struct *wq;
	struct work_struct inval_work;
	struct work_struct config_work;
	struct work_struct reset_work;
	unsigned long reset_queued;
	struct completion reset_done;
	void *backing_handle;	/* for tmem_bdev_close() */
	struct block_device *backing;
	struct tmem_stats stats;
};

static int tmem_major;
static DEFINE_IDA(tmem_ida);

static struct tmem_queue *tmem_pick_queue(struct tmem_dev *dev)
{
	return &dev->queues[raw_smp_processor_id() % dev->nq];
}

/* ---- request slot ---------------------------------------------------- */

static bool tmem_try_claim(struct tmem_queue *q)
{
	unsigned long flags;
	bool ok;

	spin_lock_irqsave(&q->lock, flags);
	ok = !q->busy && !q->dev->broken;
	if (ok)
		q->busy = true;
	spin_unlock_irqrestore(&q->lock, flags);
	return ok;
}

static int tmem_claim(struct tmem_queue *q)
{
	bool got = false;

	wait_event(q->slot_wq, (got = tmem_try_claim(q)) || READ_ONCE(q->dev->broken));
	return got ? 0 : -EIO;
}

static void tmem_release(struct tmem_queue *q)
{
	unsigned long flags;

	spin_lock_irqsave(&q->lock, flags);
	q->busy = false;
	spin_unlock_irqrestore(&q->lock, flags);
	wake_up(&q->slot_wq);
}

/* ---- virtqueue ------------------------------------------------------- */

/* Called with q->lock held and the device not broken. */
static void tmem_reap(struct tmem_queue *q)
{
	struct tmem_dev *dev = q->dev;
	unsigned int len;

	while (virtqueue_get_buf(q->vq, &len)) {
		q->done = true;
		q->used_len = len;
		if (q->async) {
			/* The free notify that posted this gave up waiting. */
			q->async = false;
			q->busy = false;
			if (q->dma->status != VIRTIO_TMEM_S_OK && q->dma->status != VIRTIO_TMEM_S_NOT_FOUND)
				atomic64_inc(&dev->stats.errors);
			atomic_dec(&dev->async_inflight);
			wake_up(&q->slot_wq);
			wake_up(&dev->async_wq);
		}
	}
}

static void tmem_vq_done(struct virtqueue *vq)
{
	struct tmem_dev *dev = vq->vdev->priv;
	struct tmem_queue *q = &dev->queues[vq->index];
	unsigned long flags;

	spin_lock_irqsave(&q->lock, flags);
	if (!dev->broken)
		tmem_reap(q);
	if (q->done && q->sleeping)
		complete(&q->compl);
	spin_unlock_irqrestore(&q->lock, flags);
}

static int tmem_post(struct tmem_queue *q, struct page *page, bool page_in)
{
	struct scatterlist hdr, data, st, *sgs[3];
	unsigned int out = 0, in = 0;
	unsigned long flags;
	bool kick = false;
	int err = -EIO;

	sg_init_one(&hdr, &q->dma->req, sizeof(q->dma->req));
	sgs[out++] = &hdr;
	if (page) {
		sg_init_table(&data, 1);
		sg_set_page(&data, page, PAGE_SIZE, 0);
		if (page_in)
			sgs[out + in++] = &data;
		else
			sgs[out++] = &data;
	}
	sg_init_one(&st, &q->dma->status, sizeof(q->dma->status));
	sgs[out + in++] = &st;

	spin_lock_irqsave(&q->lock, flags);
	if (!q->dev->broken) {
		q->done = false;
		/* ATOMIC: only an indirect table is ever allocated here. */
		err = virtqueue_add_sgs(q->vq, sgs, out, in, q, GFP_ATOMIC);
		if (!err)
			kick = virtqueue_kick_prepare(q->vq);
		else
			err = -EIO;
	}
	spin_unlock_irqrestore(&q->lock, flags);
	if (kick)
		virtqueue_notify(q->vq);
	return err;
}

static bool tmem_device_gone(struct tmem_dev *dev)
{
	u8 status = dev->vdev->config->get_status(dev->vdev);

	/* A surprise reset clears DRIVER_OK; a vanished PCI device reads 0xff. */
	return (status & VIRTIO_CONFIG_S_NEEDS_RESET) || !(status & VIRTIO_CONFIG_S_DRIVER_OK);
}

/*
 * Stop using the device: no request is posted after this, waiters are woken
 * and a work item resets the device so that it drops every buffer it holds.
 */
static void tmem_break(struct tmem_dev *dev, const char *why)
{
	unsigned long flags;
	unsigned int i;

	for (i = 0; i < dev->nq; i++) {
		spin_lock_irqsave(&dev->queues[i].lock, flags);
		dev->broken = true;
		if (dev->queues[i].sleeping)
			complete(&dev->queues[i].compl);
		spin_unlock_irqrestore(&dev->queues[i].lock, flags);
		wake_up(&dev->queues[i].slot_wq);
	}
	wake_up(&dev->async_wq);
	if (!test_and_set_bit(0, &dev->reset_queued)) {
		if (why)
			dev_err(&dev->vdev->dev, "device unusable (%s); all requests now fail\n", why);
		schedule_work(&dev->reset_work);
	}
}

static void tmem_reset_work(struct work_struct *work)
{
	struct tmem_dev *dev = container_of(work, struct tmem_dev, reset_work);

	virtio_reset_device(dev->vdev);
	complete_all(&dev->reset_done);
}

static void tmem_config_work(struct work_struct *work)
{
	struct tmem_dev *dev = container_of(work, struct tmem_dev, config_work);
	u32 magic;

	if (READ_ONCE(dev->broken))
		return;
	virtio_cread_le(dev->vdev, struct virtio_tmem_config, magic, &magic);
	if (magic != VIRTIO_TMEM_MAGIC || tmem_device_gone(dev))
		tmem_break(dev, "device reset or config changed");
}

static void tmem_config_changed(struct virtio_device *vdev)
{
	struct tmem_dev *dev = vdev->priv;

	schedule_work(&dev->config_work);
}

/*
 * Wait for the request posted on @q. Polls first; @atomic callers only poll
 * (for notify_spin_us) and get -ETIMEDOUT. Others then sleep on the
 * interrupt, checking the device's health once a second.
 */
/* What one look at a queue does besides reaping (see tmem_check). */
enum tmem_step {
	TMEM_POLL,	/* reap only */
	TMEM_ARM,	/* reap; if still not done, mark sleeping and enable callbacks */
	TMEM_DISARM,	/* after a sleep: clear sleeping, disable callbacks, reap */
};

/*
 * One look at @q under its lock. Returns whether our request is done and
 * sets *brk when the device is broken (then nothing on the ring is touched:
 * a reset may be under way).
 */
static bool tmem_check(struct tmem_queue *q, enum tmem_step step, bool *brk)
{
	struct tmem_dev *dev = q->dev;
	unsigned long flags;
	bool done;

	spin_lock_irqsave(&q->lock, flags);
	if (step == TMEM_DISARM)
		q->sleeping = false;
	if (!dev->broken) {
		if (step == TMEM_DISARM)
			virtqueue_disable_cb(q->vq);
		tmem_reap(q);
		if (step == TMEM_ARM && !q->done) {
			q->sleeping = true;
			/* false: buffers arrived meanwhile, no interrupt will come */
			if (!virtqueue_enable_cb(q->vq))
				tmem_reap(q);
		}
	}
	done = q->done;
	*brk = dev->broken;
	spin_unlock_irqrestore(&q->lock, flags);
	return done;
}

static int tmem_wait(struct tmem_queue *q, bool atomic)
{
	struct tmem_dev *dev = q->dev;
	ktime_t start = ktime_get();
	ktime_t poll_end = ktime_add_us(start, atomic ? notify_spin_us : poll_us);
	ktime_t deadline = ktime_add_ms(start, io_timeout_ms);
	bool brk;

	for (;;) {
		if (tmem_check(q, TMEM_POLL, &brk))
			return 0;
		if (brk)
			goto broken;
		if (ktime_after(ktime_get(), poll_end))
			break;
		cpu_relax();
	}
	if (atomic)
		return -ETIMEDOUT;

	for (;;) {
		reinit_completion(&q->compl);
		if (!tmem_check(q, TMEM_ARM, &brk) && !brk)
			wait_for_completion_io_timeout(&q->compl, HZ);
		if (tmem_check(q, TMEM_DISARM, &brk))
			return 0;
		if (brk)
			goto broken;
		if (tmem_device_gone(dev))
			tmem_break(dev, "device reset");
		else if (ktime_after(ktime_get(), deadline))
			tmem_break(dev, "request timed out");
	}

broken:
	/* The device may still own our buffers until it has been reset. */
	if (!atomic)
		wait_for_completion(&dev->reset_done);
	return -EIO;
}

/*
 * Post one request on the claimed queue @q and wait for it. Returns 0 with
 * the device's status in *status, or a negative errno.
 */
static int tmem_issue(struct tmem_queue *q, u8 op, u64 index, u64 arg,
		      struct page *page, bool atomic, u8 *status)
{
	struct virtio_tmem_req *req = &q->dma->req;
	int err;

	req->op = op;
	req->flags = 0;
	req->reserved = 0;
	req->pool = cpu_to_le32(pool);
	req->index = cpu_to_le64(index);
	req->arg = cpu_to_le64(arg);
	q->dma->status = TMEM_S_NONE;

	err = tmem_post(q, page, op == VIRTIO_TMEM_OP_GET);
	if (err)
		return err;
	err = tmem_wait(q, atomic);
	if (err)
		return err;
	*status = q->dma->status;
	if (*status == TMEM_S_NONE || q->used_len < 1)
		return -EIO;
	return 0;
}

/*
 * One synchronous request: claim @q's slot, post, wait, release. A GET
 * answered OK must have written the whole page. Returns 0 with the device's
 * status in *status, or a negative errno (counted in stats.errors).
 */
static int tmem_request(struct tmem_queue *q, u8 op, u64 index, u64 arg,
			struct page *page, u8 *status)
{
	int err;

	err = tmem_claim(q);
	if (err)
		return err;
	err = tmem_issue(q, op, index, arg, page, false, status);
	if (!err && op == VIRTIO_TMEM_OP_GET && *status == VIRTIO_TMEM_S_OK &&
	    q->used_len != PAGE_SIZE + 1)
		err = -EIO;
	tmem_release(q);
	if (err)
		atomic64_inc(&q->dev->stats.errors);
	return err;
}

/* ---- backing device -------------------------------------------------- */

struct tmem_backing_io {
	struct work_struct work;
	struct tmem_dev *dev;
	struct page *page;
	u64 index;
	bool write;
	int ret;
};

static void tmem_backing_io_work(struct work_struct *work)
{
	struct tmem_backing_io *io = container_of(work, struct tmem_backing_io, work);
	struct bio_vec bv;
	struct bio bio;

	bio_init(&bio, io->dev->backing, &bv, 1,
		 io->write ? REQ_OP_WRITE | REQ_SYNC : REQ_OP_READ);
	bio.bi_iter.bi_sector = io->index << (PAGE_SHIFT - SECTOR_SHIFT);
	__bio_add_page(&bio, io->page, PAGE_SIZE, 0);
	io->ret = submit_bio_wait(&bio);
	bio_uninit(&bio);
}

/*
 * Bios submitted from inside our submit_bio would only be queued on
 * current->bio_list until we return, so the backing I/O runs in a worker.
 */
static int tmem_backing_rw(struct tmem_dev *dev, struct page *page, u64 index, bool write)
{
	struct tmem_backing_io io = {
		.dev = dev, .page = page, .index = index, .write = write,
	};

	INIT_WORK_ONSTACK(&io.work, tmem_backing_io_work);
	queue_work(dev->wq, &io.work);
	flush_work(&io.work);
	destroy_work_on_stack(&io.work);
	if (!io.ret)
		atomic64_inc(write ? &dev->stats.backing_writes : &dev->stats.backing_reads);
	return io.ret;
}

/* ---- page operations ------------------------------------------------- */

/*
 * Before a PUT of @index: make sure no older invalidation of the same slot
 * can overtake it on another queue.
 */
static int tmem_order_before_put(struct tmem_dev *dev, u64 index)
{
	if (atomic_read(&dev->async_inflight)) {
		if (!wait_event_timeout(dev->async_wq,
					!atomic_read(&dev->async_inflight) || READ_ONCE(dev->broken),
					msecs_to_jiffies(io_timeout_ms)))
			tmem_break(dev, "slot-free invalidation timed out");
		if (READ_ONCE(dev->broken))
			return -EIO;
	}
	if (atomic_read(&dev->inval_count)) {
		mutex_lock(&dev->inval_mutex);
		if (test_and_clear_bit(index, dev->inval_pending))
			atomic_dec(&dev->inval_count);
		mutex_unlock(&dev->inval_mutex);
	}
	return 0;
}

static bool tmem_same_filled(struct page *page, u64 *value)
{
	const u64 *p = kmap_local_page(page);
	unsigned int i;
	bool same = true;

	for (i = 1; i < PAGE_SIZE / sizeof(*p); i++) {
		if (p[i] != p[0]) {
			same = false;
			break;
		}
	}
	*value = p[0];
	kunmap_local(p);
	return same;
}

static int tmem_write_page(struct tmem_dev *dev, struct page *page, u64 index)
{
	struct tmem_queue *q;
	bool fill = false;
	u64 value = 0;
	u8 status;
	int err;

	err = tmem_order_before_put(dev, index);
	if (err)
		return err;
	if (dev->caps & VIRTIO_TMEM_CAP_PUT_FILL)
		fill = tmem_same_filled(page, &value);

	q = tmem_pick_queue(dev);
	if (fill)
		err = tmem_request(q, VIRTIO_TMEM_OP_PUT_FILL, index, value, NULL, &status);
	else
		err = tmem_request(q, VIRTIO_TMEM_OP_PUT, index, 0, page, &status);
	if (err)
		return err;

	switch (status) {
	case VIRTIO_TMEM_S_OK:
		set_bit(index, dev->in_host);
		if (dev->in_backing)
			clear_bit(index, dev->in_backing);
		atomic64_inc(fill ? &dev->stats.fills : &dev->stats.stores);
		return 0;
	case VIRTIO_TMEM_S_REJECTED:
		/* A rejected put also dropped the host's older copy. */
		clear_bit(index, dev->in_host);
		atomic64_inc(&dev->stats.rejects);
		if (!dev->backing)
			return -EIO;
		err = tmem_backing_rw(dev, page, index, true);
		if (err) {
			clear_bit(index, dev->in_backing);
			atomic64_inc(&dev->stats.errors);
			return err;
		}
		set_bit(index, dev->in_backing);
		return 0;
	default:
		atomic64_inc(&dev->stats.errors);
		return -EIO;
	}
}

static int tmem_read_page(struct tmem_dev *dev, struct page *page, u64 index)
{
	u8 status;
	int err;

	if (dev->in_backing && test_bit(index, dev->in_backing))
		return tmem_backing_rw(dev, page, index, false);
	if (!test_bit(index, dev->in_host)) {
		/* Never written (or discarded): reads as zeroes. */
		memzero_page(page, 0, PAGE_SIZE);
		return 0;
	}

	err = tmem_request(tmem_pick_queue(dev), VIRTIO_TMEM_OP_GET, index, 0, page, &status);
	if (err)
		return err;
	switch (status) {
	case VIRTIO_TMEM_S_OK:
		atomic64_inc(&dev->stats.loads);
		return 0;
	case VIRTIO_TMEM_S_NOT_FOUND:
		/* We stored it and the host lost it: never hand out wrong data. */
		atomic64_inc(&dev->stats.not_found);
		return -EIO;
	default:
		atomic64_inc(&dev->stats.errors);
		return -EIO;
	}
}

/*
 * Forget whatever an earlier boot left in our pool before the first request
 * of this one (docs/protocol.md section 6): the host cannot always tell a
 * reboot from a pause, so the driver says so.
 */
static int tmem_invalidate_pool(struct tmem_dev *dev)
{
	u8 status;
	int err;

	err = tmem_request(&dev->queues[0], VIRTIO_TMEM_OP_INVALIDATE_POOL, 0, 0, NULL, &status);
	if (!err && status != VIRTIO_TMEM_S_OK)
		err = -EIO;
	return err;
}

/* Sleeping invalidation of one slot (discard, write-zeroes, missed notifies). */
static int tmem_invalidate_page(struct tmem_dev *dev, u64 index)
{
	u8 status;
	int err;

	if (dev->in_backing)
		clear_bit(index, dev->in_backing);
	if (!test_bit(index, dev->in_host))
		return 0;
	err = tmem_request(tmem_pick_queue(dev), VIRTIO_TMEM_OP_INVALIDATE_PAGE, index, 0, NULL,
			   &status);
	if (err)
		return err;
	if (status != VIRTIO_TMEM_S_OK && status != VIRTIO_TMEM_S_NOT_FOUND) {
		atomic64_inc(&dev->stats.errors);
		return -EIO;
	}
	clear_bit(index, dev->in_host);
	atomic64_inc(&dev->stats.invalidates);
	return 0;
}

static void tmem_inval_work(struct work_struct *work)
{
	struct tmem_dev *dev = container_of(work, struct tmem_dev, inval_work);
	unsigned long i;

	mutex_lock(&dev->inval_mutex);
	for_each_set_bit(i, dev->inval_pending, dev->capacity) {
		if (READ_ONCE(dev->broken))
			break;
		if (!test_and_clear_bit(i, dev->inval_pending))
			continue;
		atomic_dec(&dev->inval_count);
		tmem_invalidate_page(dev, i);
	}
	mutex_unlock(&dev->inval_mutex);
}

/*
 * The swap layer freed a slot; called under the swap device's spinlock, so
 * nothing here may sleep. If the queue's slot is busy the invalidation is
 * deferred to a worker (counted as a miss); if the host is slow to answer it
 * completes asynchronously and PUTs wait for it (tmem_order_before_put).
 */
static void tmem_slot_free_notify(struct block_device *bdev, unsigned long index)
{
	struct tmem_dev *dev = bdev->bd_disk->private_data;
	unsigned int i, first;
	struct tmem_queue *q;
	unsigned long flags;
	u8 status;
	int err;

	if (index >= dev->capacity || READ_ONCE(dev->broken))
		return;
	if (dev->in_backing)
		clear_bit(index, dev->in_backing);
	if (!test_bit(index, dev->in_host))
		return;

	/* Any free queue will do: the invalidation completes before we return. */
	first = raw_smp_processor_id();
	for (i = 0; i < dev->nq; i++) {
		q = &dev->queues[(first + i) % dev->nq];
		if (tmem_try_claim(q))
			break;
	}
	if (i == dev->nq) {
		atomic64_inc(&dev->stats.notify_misses);
		if (!test_and_set_bit(index, dev->inval_pending))
			atomic_inc(&dev->inval_count);
		queue_work(dev->wq, &dev->inval_work);
		return;
	}
	err = tmem_issue(q, VIRTIO_TMEM_OP_INVALIDATE_PAGE, index, 0, NULL, true, &status);
	if (err == -ETIMEDOUT) {
		clear_bit(index, dev->in_host);
		spin_lock_irqsave(&q->lock, flags);
		if (!q->done && !dev->broken) {
			q->async = true;
			atomic_inc(&dev->async_inflight);
			if (!virtqueue_enable_cb(q->vq))
				tmem_reap(q);
			spin_unlock_irqrestore(&q->lock, flags);
			return;	/* the reaper releases the slot */
		}
		spin_unlock_irqrestore(&q->lock, flags);
		err = q->done ? 0 : -EIO;
		status = q->dma->status;
	}
	tmem_release(q);
	if (err || (status != VIRTIO_TMEM_S_OK && status != VIRTIO_TMEM_S_NOT_FOUND)) {
		atomic64_inc(&dev->stats.errors);
		return;
	}
	clear_bit(index, dev->in_host);
	atomic64_inc(&dev->stats.invalidates);
}

/* ---- block device ---------------------------------------------------- */

static int tmem_rw_bio(struct tmem_dev *dev, struct bio *bio)
{
	bool write = op_is_write(bio_op(bio));
	struct bvec_iter iter;
	struct bio_vec bv;
	u64 index;
	int err;

	if (bio->bi_iter.bi_sector & (PAGE_SECTORS - 1))
		return -EIO;
	bio_for_each_segment(bv, bio, iter) {
		index = iter.bi_sector >> (PAGE_SHIFT - SECTOR_SHIFT);
		/* The 4 KiB logical block size makes every segment a whole page. */
		if (bv.bv_len != PAGE_SIZE || bv.bv_offset || index >= dev->capacity)
			return -EIO;
		if (write)
			err = tmem_write_page(dev, bv.bv_page, index);
		else
			err = tmem_read_page(dev, bv.bv_page, index);
		if (err)
			return err;
	}
	return 0;
}

static int tmem_discard_bio(struct tmem_dev *dev, struct bio *bio)
{
	u64 first = DIV_ROUND_UP_ULL(bio->bi_iter.bi_sector, PAGE_SECTORS);
	u64 end = (bio->bi_iter.bi_sector + bio_sectors(bio)) >> (PAGE_SHIFT - SECTOR_SHIFT);
	u64 index;
	int err;

	/* Partial pages at either end are left alone, as a discard may. */
	end = min(end, dev->capacity);
	for (index = first; index < end; index++) {
		err = tmem_invalidate_page(dev, index);
		if (err)
			return err;
		cond_resched();
	}
	return 0;
}

static void tmem_submit_bio(struct bio *bio)
{
	struct tmem_dev *dev = bio->bi_bdev->bd_disk->private_data;
	int err;

	switch (bio_op(bio)) {
	case REQ_OP_READ:
	case REQ_OP_WRITE:
		err = tmem_rw_bio(dev, bio);
		break;
	case REQ_OP_DISCARD:
	case REQ_OP_WRITE_ZEROES:
		err = tmem_discard_bio(dev, bio);
		break;
	case REQ_OP_FLUSH:
		err = 0;	/* every write is already in the host */
		break;
	default:
		err = -EOPNOTSUPP;
		break;
	}
	bio->bi_status = errno_to_blk_status(err);
	bio_endio(bio);
}

#if TMEM_HAVE_RW_PAGE
/*
 * Swap's synchronous path on kernels that have rw_page (see compat.h).
 * On failure the caller retries through a bio, which reports the error.
 */
static int tmem_rw_page(struct block_device *bdev, sector_t sector,
			struct page *page, enum req_op op)
{
	struct tmem_dev *dev = bdev->bd_disk->private_data;
	u64 index = sector >> (PAGE_SHIFT - SECTOR_SHIFT);
	int err;

	if (PageTransHuge(page) || (sector & (PAGE_SECTORS - 1)) || index >= dev->capacity)
		return -EOPNOTSUPP;
	if (op_is_write(op))
		err = tmem_write_page(dev, page, index);
	else
		err = tmem_read_page(dev, page, index);
	if (!err)
		page_endio(page, op_is_write(op), 0);
	return err;
}
#endif

static void tmem_free_dev(struct tmem_dev *dev)
{
	unsigned int i;

	if (dev->wq)
		destroy_workqueue(dev->wq);
	if (dev->backing_handle)
		tmem_bdev_close(dev->backing_handle, dev);
	kvfree(dev->in_host);
	kvfree(dev->in_backing);
	kvfree(dev->inval_pending);
	if (dev->queues)
		for (i = 0; i < dev->nq; i++)
			kfree(dev->queues[i].dma);
	kfree(dev->queues);
	if (dev->id >= 0)
		ida_free(&tmem_ida, dev->id);
	kfree(dev);
}

/* Last reference to the disk: swap may keep it open after the device left. */
static void tmem_free_disk(struct gendisk *disk)
{
	tmem_free_dev(disk->private_data);
}

static const struct block_device_operations tmem_fops = {
	.owner = THIS_MODULE,
	.submit_bio = tmem_submit_bio,
#if TMEM_HAVE_RW_PAGE
	.rw_page = tmem_rw_page,
#endif
	.swap_slot_free_notify = tmem_slot_free_notify,
	.free_disk = tmem_free_disk,
};

/* ---- sysfs ----------------------------------------------------------- */

#define TMEM_STAT_ATTR(_name)						\
static ssize_t _name##_show(struct device *d,				\
			    struct device_attribute *attr, char *buf)	\
{									\
	struct tmem_dev *dev = dev_to_disk(d)->private_data;		\
									\
	return sysfs_emit(buf, "%lld\n",				\
			  (long long)atomic64_read(&dev->stats._name));	\
}									\
static DEVICE_ATTR_RO(_name)

TMEM_STAT_ATTR(stores);
TMEM_STAT_ATTR(fills);
TMEM_STAT_ATTR(loads);
TMEM_STAT_ATTR(rejects);
TMEM_STAT_ATTR(invalidates);
TMEM_STAT_ATTR(not_found);
TMEM_STAT_ATTR(errors);
TMEM_STAT_ATTR(notify_misses);
TMEM_STAT_ATTR(backing_writes);
TMEM_STAT_ATTR(backing_reads);

static ssize_t queues_show(struct device *d, struct device_attribute *attr, char *buf)
{
	struct tmem_dev *dev = dev_to_disk(d)->private_data;

	return sysfs_emit(buf, "%u\n", dev->nq);
}
static DEVICE_ATTR_RO(queues);

static struct attribute *tmem_attrs[] = {
	&dev_attr_stores.attr,
	&dev_attr_fills.attr,
	&dev_attr_loads.attr,
	&dev_attr_rejects.attr,
	&dev_attr_invalidates.attr,
	&dev_attr_not_found.attr,
	&dev_attr_errors.attr,
	&dev_attr_notify_misses.attr,
	&dev_attr_backing_writes.attr,
	&dev_attr_backing_reads.attr,
	&dev_attr_queues.attr,
	NULL,
};

static const struct attribute_group tmem_attr_group = {
	.name = "tmem",
	.attrs = tmem_attrs,
};

static const struct attribute_group *tmem_attr_groups[] = {
	&tmem_attr_group,
	NULL,
};

/* ---- probe / remove -------------------------------------------------- */

static int tmem_open_backing(struct tmem_dev *dev)
{
	sector_t need = dev->capacity << (PAGE_SHIFT - SECTOR_SHIFT);
	struct block_device *bdev;

	bdev = tmem_bdev_open(backing_dev, dev, &dev->backing_handle);
	if (IS_ERR(bdev))
		return PTR_ERR(bdev);
	dev->backing = bdev;
	if (bdev_nr_sectors(bdev) < need) {
		dev_err(&dev->vdev->dev, "backing_dev %s is smaller than %llu pages\n",
			backing_dev, dev->capacity);
		return -ENOSPC;
	}
	dev->in_backing = kvcalloc(BITS_TO_LONGS(dev->capacity), sizeof(long), GFP_KERNEL);
	return dev->in_backing ? 0 : -ENOMEM;
}

static int tmem_setup_vqs(struct tmem_dev *dev)
{
	struct virtqueue **vqs;
	const char **names;
	unsigned int i;
	int err = -ENOMEM;

	vqs = kcalloc(dev->nq, sizeof(*vqs), GFP_KERNEL);
	names = kcalloc(dev->nq, sizeof(*names), GFP_KERNEL);
	if (!vqs || !names)
		goto out;
	for (i = 0; i < dev->nq; i++)
		names[i] = dev->queues[i].name;
	err = tmem_find_vqs(dev->vdev, dev->nq, vqs, tmem_vq_done, names);
	if (!err) {
		for (i = 0; i < dev->nq; i++) {
			dev->queues[i].vq = vqs[i];
			/* Submitters poll; callbacks are enabled only to sleep. */
			virtqueue_disable_cb(vqs[i]);
		}
	}
out:
	kfree(names);
	kfree(vqs);
	return err;
}

static int tmem_alloc_disk(struct tmem_dev *dev)
{
	struct gendisk *disk;
	int err;

	disk = tmem_blk_alloc_disk();
	if (IS_ERR(disk))
		return PTR_ERR(disk);
	disk->major = tmem_major;
	disk->first_minor = dev->id;
	disk->minors = 1;
	disk->flags |= GENHD_FL_NO_PART;
	disk->fops = &tmem_fops;
	disk->private_data = dev;
	snprintf(disk->disk_name, sizeof(disk->disk_name), "tmem%d", dev->id);
	set_capacity(disk, dev->capacity << (PAGE_SHIFT - SECTOR_SHIFT));

	err = device_add_disk(&dev->vdev->dev, disk, tmem_attr_groups);
	if (err) {
		put_disk(disk);
		return err;
	}
	dev->disk = disk;
	return 0;
}

static int tmem_probe(struct virtio_device *vdev)
{
	struct tmem_dev *dev;
	u32 magic, page_size, caps;
	u16 version, num_queues;
	u64 capacity;
	unsigned int i;
	int err;

	if (!vdev->config->get) {
		dev_err(&vdev->dev, "config space is not readable\n");
		return -EINVAL;
	}
	virtio_cread_le(vdev, struct virtio_tmem_config, magic, &magic);
	virtio_cread_le(vdev, struct virtio_tmem_config, version, &version);
	if (magic != VIRTIO_TMEM_MAGIC || version != VIRTIO_TMEM_VERSION) {
		dev_err(&vdev->dev, "not a tmem v%d device (magic %#x version %u)\n",
			VIRTIO_TMEM_VERSION, magic, version);
		return -ENODEV;
	}
	virtio_cread_le(vdev, struct virtio_tmem_config, num_queues, &num_queues);
	virtio_cread_le(vdev, struct virtio_tmem_config, page_size, &page_size);
	virtio_cread_le(vdev, struct virtio_tmem_config, caps, &caps);
	virtio_cread_le(vdev, struct virtio_tmem_config, capacity_pages, &capacity);
	if (page_size != VIRTIO_TMEM_PAGE_SIZE || PAGE_SIZE != VIRTIO_TMEM_PAGE_SIZE) {
		dev_err(&vdev->dev, "page size %u unsupported\n", page_size);
		return -ENODEV;
	}

	dev = kzalloc(sizeof(*dev), GFP_KERNEL);
	if (!dev)
		return -ENOMEM;
	dev->vdev = vdev;
	dev->caps = caps;
	dev->id = ida_alloc_max(&tmem_ida, MINORMASK, GFP_KERNEL);
	if (dev->id < 0) {
		err = dev->id;
		goto err_free;
	}
	if (capacity_mb)
		capacity = (u64)capacity_mb << (20 - PAGE_SHIFT);
	else if (!capacity)
		capacity = 2 * (u64)totalram_pages();
	dev->capacity = capacity;

	dev->nq = max_t(unsigned int, num_queues, 1);
	dev->nq = min_t(unsigned int, dev->nq, nr_cpu_ids);
	if (max_queues)
		dev->nq = min(dev->nq, max_queues);
	atomic_set(&dev->inval_count, 0);
	atomic_set(&dev->async_inflight, 0);
	init_waitqueue_head(&dev->async_wq);
	mutex_init(&dev->inval_mutex);
	INIT_WORK(&dev->inval_work, tmem_inval_work);
	INIT_WORK(&dev->config_work, tmem_config_work);
	INIT_WORK(&dev->reset_work, tmem_reset_work);
	init_completion(&dev->reset_done);

	err = -ENOMEM;
	dev->queues = kcalloc(dev->nq, sizeof(*dev->queues), GFP_KERNEL);
	if (!dev->queues)
		goto err_free;
	for (i = 0; i < dev->nq; i++) {
		struct tmem_queue *q = &dev->queues[i];

		spin_lock_init(&q->lock);
		init_completion(&q->compl);
		init_waitqueue_head(&q->slot_wq);
		q->dev = dev;
		snprintf(q->name, sizeof(q->name), "tmem.%u", i);
		/* Header and status are DMA targets: never on the stack. */
		q->dma = kzalloc(sizeof(*q->dma), GFP_KERNEL);
		if (!q->dma)
			goto err_free;
	}
	dev->in_host = kvcalloc(BITS_TO_LONGS(dev->capacity), sizeof(long), GFP_KERNEL);
	dev->inval_pending = kvcalloc(BITS_TO_LONGS(dev->capacity), sizeof(long), GFP_KERNEL);
	if (!dev->in_host || !dev->inval_pending)
		goto err_free;
	/* Reclaim may wait on this queue, so it needs a rescuer thread. */
	dev->wq = alloc_workqueue("tmem%d", WQ_MEM_RECLAIM | WQ_UNBOUND, 0, dev->id);
	if (!dev->wq)
		goto err_free;
	if (backing_dev && *backing_dev && dev->id == 0) {
		err = tmem_open_backing(dev);
		if (err) {
			dev_err(&vdev->dev, "cannot use backing_dev %s: %d\n", backing_dev, err);
			goto err_free;
		}
	}

	vdev->priv = dev;
	err = tmem_setup_vqs(dev);
	if (err)
		goto err_free;

	/* The VMM starts the backend on DRIVER_OK: before the first request. */
	virtio_device_ready(vdev);

	err = tmem_invalidate_pool(dev);
	if (err) {
		dev_err(&vdev->dev, "cannot clear pool %u: %d\n", pool, err);
		goto err_reset;
	}

	err = tmem_alloc_disk(dev);
	if (err)
		goto err_reset;

	dev_info(&vdev->dev, "tmem%d: %llu MiB, %u queue(s), caps %#x%s%s\n",
		 dev->id, dev->capacity >> (20 - PAGE_SHIFT), dev->nq, caps,
		 dev->backing ? ", backing_dev " : "", dev->backing ? backing_dev : "");
	return 0;

err_reset:
	virtio_reset_device(vdev);
	vdev->config->del_vqs(vdev);
err_free:
	vdev->priv = NULL;
	tmem_free_dev(dev);
	return err;
}

static void tmem_remove(struct virtio_device *vdev)
{
	struct tmem_dev *dev = vdev->priv;

	/* No new bios after this; it waits for the ones in flight. */
	del_gendisk(dev->disk);
	cancel_work_sync(&dev->config_work);
	/* Fail anything that still arrives (slot-free notifies) and reset. */
	tmem_break(dev, NULL);
	flush_work(&dev->reset_work);
	cancel_work_sync(&dev->config_work);
	flush_workqueue(dev->wq);
	vdev->config->del_vqs(vdev);
	vdev->priv = NULL;
	/* dev is freed by tmem_free_disk once swap has closed the disk too. */
	put_disk(dev->disk);
}

static const struct virtio_device_id tmem_id_table[] = {
	{ VIRTIO_ID_TMEM, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, tmem_id_table);

static struct virtio_driver tmem_driver = {
	.driver.name = KBUILD_MODNAME,
	.driver.owner = THIS_MODULE,
	.id_table = tmem_id_table,
	.probe = tmem_probe,
	.remove = tmem_remove,
	.config_changed = tmem_config_changed,
};

static int __init tmem_init(void)
{
	int err;

	tmem_major = register_blkdev(0, "tmem");
	if (tmem_major < 0)
		return tmem_major;
	err = register_virtio_driver(&tmem_driver);
	if (err)
		unregister_blkdev(tmem_major, "tmem");
	return err;
}

static void __exit tmem_exit(void)
{
	unregister_virtio_driver(&tmem_driver);
	unregister_blkdev(tmem_major, "tmem");
	ida_destroy(&tmem_ida);
}

module_init(tmem_init);
module_exit(tmem_exit);

MODULE_DESCRIPTION("Transcendent memory swap device over virtio (vhost-user-tmem)");
MODULE_LICENSE("GPL");
